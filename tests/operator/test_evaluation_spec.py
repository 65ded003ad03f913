"""spec.evaluation: a path or a ConfigMap key reaches the worker as ALCHEMIST_EVALUATION_*; a bad one is invalid."""

from __future__ import annotations

from typing import Any

import pytest
from alchemist_operator.evaluation_set import EVALUATION_FILE, evaluation_config
from alchemist_operator.job_spec import InvalidSpec, parse_job_spec
from alchemist_operator.naming import JobRef
from alchemist_operator.operator_config import OperatorConfig
from alchemist_operator.statefulset import build_statefulset
from alchemist_operator.worker_env import worker_config
from kmock import KubernetesEmulator

from tests.operator.conftest import eventually, job_manifest, running_operator
from tests.operator.test_operator import JOB_PATH, condition, events, status

JOB = JobRef(namespace="team-a", name="chat", uid="1234")
MODEL = {"path": "/models/smollm2"}


def pod(spec: dict[str, Any]) -> dict[str, Any]:
    parsed = parse_job_spec({"model": MODEL, **spec})
    sts = build_statefulset(JOB, parsed, "alchemist:dev", worker_config(JOB, parsed), "redis://r:6379")
    pod_spec: dict[str, Any] = sts["spec"]["template"]["spec"]
    return pod_spec


def test_no_evaluation_means_no_gate() -> None:
    spec = parse_job_spec({"model": MODEL})
    assert spec.evaluation is None
    assert not any(k.startswith("ALCHEMIST_EVALUATION") for k in worker_config(JOB, spec))
    assert not any(v["name"] == "evaluation-set" for v in pod({})["volumes"])


def test_a_path_goes_to_the_worker_as_is() -> None:
    spec = parse_job_spec(
        {"model": MODEL, "evaluation": {"path": "/data/eval.jsonl", "maxPerplexityIncrease": 0.1}}
    )
    config = worker_config(JOB, spec)
    assert config["ALCHEMIST_EVALUATION_SET"] == "/data/eval.jsonl"
    assert config["ALCHEMIST_EVALUATION_MAX_PERPLEXITY_INCREASE"] == "0.1"
    assert config["ALCHEMIST_EVALUATION_MAX_EXACT_MATCH_DROP"] == "0.05"  # the default bound
    assert not any(
        v["name"] == "evaluation-set" for v in pod({"evaluation": {"path": "/data/eval.jsonl"}})["volumes"]
    )


def test_a_config_map_key_is_mounted_read_only_as_the_set() -> None:
    evaluation = {"configMap": {"name": "chat-eval", "key": "general.jsonl"}}
    spec = parse_job_spec({"model": MODEL, "evaluation": evaluation})
    assert evaluation_config(spec)["ALCHEMIST_EVALUATION_SET"] == EVALUATION_FILE
    pod_spec = pod({"evaluation": evaluation})
    (volume,) = [v for v in pod_spec["volumes"] if v["name"] == "evaluation-set"]
    assert volume["configMap"] == {
        "name": "chat-eval",
        "items": [{"key": "general.jsonl", "path": "eval.jsonl"}],
    }
    (container,) = pod_spec["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "evaluation-set"]
    assert mount == {
        "name": "evaluation-set",
        "mountPath": EVALUATION_FILE.rsplit("/", 1)[0],
        "readOnly": True,
    }


@pytest.mark.parametrize(
    ("evaluation", "message"),
    [
        ({}, "spec.evaluation: Value error, give exactly one of path"),
        ({"path": "/a", "configMap": {"name": "c", "key": "k"}}, "give exactly one of path"),
        ({"path": "relative.jsonl"}, "spec.evaluation.path: String should match pattern"),
        ({"configMap": {"name": "c"}}, "spec.evaluation.configMap.key: Field required"),
        ({"configMap": {"name": "c", "key": "a/b"}}, "spec.evaluation.configMap.key: String should match"),
        (
            {"path": "/a", "maxExactMatchDrop": 2},
            "spec.evaluation.maxExactMatchDrop: Input should be less than",
        ),
        (
            {"path": "/a", "maxPerplexityIncrease": -1},
            "spec.evaluation.maxPerplexityIncrease: Input should be",
        ),
    ],
)
def test_bad_evaluation_specs_name_the_field(evaluation: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        parse_job_spec({"model": MODEL, "evaluation": evaluation})


async def test_an_invalid_evaluation_spec_is_a_condition_and_a_warning_event(
    kube: KubernetesEmulator, operator_config: OperatorConfig
) -> None:
    await kube.post(
        JOB_PATH, json=job_manifest(evaluation={"path": "/a", "configMap": {"name": "c", "key": "k"}})
    )
    async with running_operator(operator_config):
        await eventually(lambda: status(kube).get("phase") == "Invalid")
        valid = condition(kube, "Valid")
        assert valid is not None and valid[0] == "False" and "give exactly one of path" in valid[2]
        await eventually(
            lambda: any(e["reason"] == "InvalidSpec" and e["type"] == "Warning" for e in events(kube))
        )
