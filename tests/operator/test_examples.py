"""The example jobs: valid against the CRD schema, accepted by the operator's own checks, and buildable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from alchemist_operator.children import desired_children
from alchemist_operator.naming import JobRef
from alchemist_operator.operator_config import OperatorConfig
from alchemist_operator.spec_checks import validate_job

from tests.charts.manifest_validation import crd_schemas, validate_manifest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CONFIG = OperatorConfig(default_redis_url="redis://alc-alchemist-redis.alchemist.svc:6379/0")


def example_jobs() -> list[dict[str, Any]]:
    docs = [
        doc for path in sorted(EXAMPLES.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc
    ]
    return [doc for doc in docs if doc["kind"] == "ContinualLearningJob"]


def test_there_is_a_gpu_and_a_cpu_example() -> None:
    gpus = sorted(job["spec"].get("resources", {}).get("gpus", 1) for job in example_jobs())
    assert gpus[0] == 0 and gpus[-1] >= 1


@pytest.mark.parametrize("job", example_jobs(), ids=lambda job: job["metadata"]["name"])
def test_example_is_valid_and_buildable(job: dict[str, Any], crd: dict[str, Any]) -> None:
    validate_manifest(job, crd_schemas([crd]))
    spec = validate_job(job["metadata"]["name"], job["spec"], CONFIG)
    ref = JobRef(job["metadata"]["namespace"], job["metadata"]["name"], "uid")
    for manifest in desired_children(ref, spec, CONFIG):
        validate_manifest(manifest, {})


def test_the_crd_schema_catches_what_it_can(crd: dict[str, Any]) -> None:
    job = example_jobs()[0]
    bad = {**job, "spec": {**job["spec"], "replicas": -1, "engine": "tgi"}}
    with pytest.raises(AssertionError, match="does not match its CRD"):
        validate_manifest(bad, crd_schemas([crd]))
