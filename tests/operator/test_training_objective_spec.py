"""The training objective and its knobs in the spec: defaults, the worker's environment, and bad values refused
(a field error from the model, a Valid=False condition and a Warning Event from the running operator)."""

from __future__ import annotations

import pytest
from alchemist_operator.job_spec import InvalidSpec, Objective, parse_job_spec
from alchemist_operator.operator_config import OperatorConfig
from kmock import KubernetesEmulator

from tests.operator.conftest import eventually, has_object, job_manifest, running_operator
from tests.operator.test_children import children
from tests.operator.test_operator import JOB_PATH, NS, STS, condition, status
from tests.operator.test_operator_failures import warning


def test_objective_knobs_reach_the_worker_environment() -> None:
    data = children(training={"objective": "dpo", "beta": 0.2, "klWeight": 0.05})["ConfigMap/chat-config"][
        "data"
    ]
    assert data["ALCHEMIST_TRAINING_OBJECTIVE"] == "dpo"
    assert data["ALCHEMIST_TRAINING_BETA"] == "0.2"
    assert data["ALCHEMIST_TRAINING_KL_WEIGHT"] == "0.05"
    assert data["ALCHEMIST_TRAINING_DESIRABLE_WEIGHT"] == "1.0"
    assert data["ALCHEMIST_TRAINING_UNDESIRABLE_WEIGHT"] == "1.0"
    default = parse_job_spec({"model": {"path": "/m"}}).training
    assert default.objective is Objective.SUPERVISED and default.kl_weight == 0.0


def test_rehearsal_and_the_held_version_policy_reach_the_worker_environment() -> None:
    manifest = children(
        training={"rehearsal": {"samples": 4, "capacity": 64}},
        evaluation={"path": "/sets/eval.jsonl", "onHeld": "continue", "heldBackoff": 0.25},
    )
    data = manifest["ConfigMap/chat-config"]["data"]
    assert data["ALCHEMIST_TRAINING_REHEARSAL_SAMPLES"] == "4"
    assert data["ALCHEMIST_TRAINING_REHEARSAL_CAPACITY"] == "64"
    assert data["ALCHEMIST_EVALUATION_ON_HELD"] == "continue"
    assert data["ALCHEMIST_EVALUATION_HELD_BACKOFF"] == "0.25"
    spec = parse_job_spec({"model": {"path": "/m"}, "evaluation": {"path": "/sets/eval.jsonl"}})
    assert spec.training.rehearsal.samples == 0 and spec.training.rehearsal.capacity == 512
    assert spec.evaluation is not None and spec.evaluation.on_held.value == "revert"
    assert spec.evaluation.held_backoff == 0.5


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"training": {"rehearsal": {"samples": -1}}}, "spec.training.rehearsal.samples"),
        ({"training": {"rehearsal": {"capacity": 0}}}, "spec.training.rehearsal.capacity"),
        ({"evaluation": {"path": "/e.jsonl", "onHeld": "rewind"}}, "spec.evaluation.onHeld"),
        ({"evaluation": {"path": "/e.jsonl", "heldBackoff": 0}}, "spec.evaluation.heldBackoff"),
        ({"evaluation": {"path": "/e.jsonl", "heldBackoff": 1.5}}, "spec.evaluation.heldBackoff"),
        ({"evaluation": {"path": "/e.jsonl", "heldBackoff": float("nan")}}, "spec.evaluation.heldBackoff"),
        ({"evaluation": {"path": "/e.jsonl", "heldBackoff": -1e308}}, "spec.evaluation.heldBackoff"),
        ({"evaluation": {"path": "/e.jsonl", "heldBackoff": "half"}}, "spec.evaluation.heldBackoff"),
    ],
)
def test_bad_rehearsal_and_held_policy_name_their_field(spec: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidSpec, match=field.replace(".", r"\.")):
        parse_job_spec({"model": {"path": "/m"}, **spec})


@pytest.mark.parametrize(
    ("training", "field"),
    [
        ({"objective": "rlhf"}, "spec.training.objective"),
        ({"beta": 0}, "spec.training.beta"),
        ({"klWeight": -0.1}, "spec.training.klWeight"),
        ({"undesirableWeight": -1}, "spec.training.undesirableWeight"),
    ],
)
def test_bad_objective_settings_name_their_field(training: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidSpec, match=field.replace(".", r"\.")):
        parse_job_spec({"model": {"path": "/m"}, "training": training})


async def test_an_unknown_objective_is_an_invalid_spec_condition_and_a_warning(
    kube: KubernetesEmulator, operator_config: OperatorConfig
) -> None:
    await kube.post(JOB_PATH, json=job_manifest(training={"objective": "rlhf"}))
    async with running_operator(operator_config):
        await eventually(lambda: status(kube).get("phase") == "Invalid")
        valid = condition(kube, "Valid")
        assert valid is not None and valid[:2] == ("False", "InvalidSpec")
        assert "spec.training.objective" in valid[2]
        assert (await eventually(lambda: warning(kube, "InvalidSpec")))["involvedObject"]["name"] == "chat"
        assert not has_object(kube, STS, NS, "chat")
