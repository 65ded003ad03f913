"""Specs the schema lets through but the operator cannot act on: each gets one clear message."""

from __future__ import annotations

from typing import Any

import pytest
from alchemist_operator.job_spec import InvalidSpec, parse_job_spec
from alchemist_operator.naming import job_name_problem
from alchemist_operator.operator_config import OperatorConfig
from alchemist_operator.spec_checks import spec_problems, validate_job

WITH_REDIS = OperatorConfig(default_redis_url="redis://redis:6379/0")
WITHOUT_REDIS = OperatorConfig()


def problems(spec: dict[str, Any], name: str = "chat", config: OperatorConfig = WITH_REDIS) -> list[str]:
    return spec_problems(name, parse_job_spec({"model": {"path": "/m"}, **spec}), config)


def test_a_plain_spec_has_no_problems() -> None:
    assert problems({}) == []
    assert problems({"feedback": {"redisUrl": "redis://r:6379"}}, config=WITHOUT_REDIS) == []


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"replicas": 2, "rollout": {"strategy": "Canary", "canary": {"replicas": 2}}},
            "must be smaller than spec.replicas",
        ),
        ({"model": {"path": "m", "source": "Volume"}}, "claimName is required"),
        ({"model": {"path": "/m", "claimName": "weights"}}, "only used with spec.model.source Volume"),
        ({"model": {"path": "relative"}}, "must be absolute"),
        ({"feedback": {"redisUrl": "redis://a", "redisSecretRef": {"name": "s"}}}, "not both"),
        ({"training": {"lora": {"targetModules": []}}}, "at least one module"),
        (
            {"resources": {"memory": "8Gi"}, "recording": {"hostMemory": "8Gi"}},
            "must be smaller than spec.resources.memory",
        ),
        ({"env": [{"name": "ALCHEMIST_REPLICA", "value": "x"}]}, "must not set ALCHEMIST_REPLICA"),
        ({"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}, "sets A more than once"),
        ({"replicas": 2, "versions": {"storage": "EmptyDir"}}, "EmptyDir loses versions with each pod"),
        ({"resources": {"gpus": 2}}, "the worker uses 1 device per pod"),
        (
            {"env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]},
            "A: set value or valueFrom, not both",
        ),
        (
            {
                "env": [
                    {
                        "name": "A",
                        "valueFrom": {
                            "fieldRef": {"fieldPath": "metadata.name"},
                            "secretKeyRef": {"name": "s", "key": "k"},
                        },
                    }
                ]
            },
            "exactly one of secretKeyRef",
        ),
        (
            {"env": [{"name": "ALCHEMIST_REDIS_PASSWORD", "value": "x"}]},
            "must not set ALCHEMIST_REDIS_PASSWORD",
        ),
    ],
)
def test_each_problem_is_named(spec: dict[str, Any], expected: str) -> None:
    found = problems(spec)
    assert len(found) == 1 and expected in found[0], found


def test_canary_needs_a_stable_replica_but_scaled_to_zero_is_fine() -> None:
    canary = {"rollout": {"strategy": "Canary", "canary": {"replicas": 1}}}
    assert problems({"replicas": 2, **canary}) == []
    assert problems({"replicas": 0, **canary}) == []
    assert problems({"replicas": 1, **canary})


def test_no_redis_anywhere_is_a_problem_only_without_an_operator_default() -> None:
    assert any("no Redis for feedback" in p for p in problems({}, config=WITHOUT_REDIS))
    assert problems({}, config=WITH_REDIS) == []


def test_job_names_must_fit_services_and_pod_labels() -> None:
    assert job_name_problem("chat-2") is None
    assert "DNS label" in (job_name_problem("2chat") or "")
    assert "DNS label" in (job_name_problem("chat.v2") or "")
    assert "at most 52" in (job_name_problem("a" * 53) or "")
    assert any(p.startswith("metadata.name") for p in problems({}, name="a" * 60))


def test_validate_job_reports_every_problem_at_once() -> None:
    raw = {"model": {"path": "rel"}, "replicas": 1, "rollout": {"strategy": "Canary"}}
    with pytest.raises(InvalidSpec) as err:
        validate_job("chat", raw, WITH_REDIS)
    assert "must be absolute" in str(err.value) and "must be smaller than spec.replicas" in str(err.value)
    with pytest.raises(InvalidSpec, match=r"spec\.replicas"):
        validate_job("chat", {"model": {"path": "/m"}, "replicas": "two"}, WITH_REDIS)
