"""Every worker of a training job trains in one data-parallel group, reaching the leader by its stable pod name;
the settings do not depend on `replicas`, so scaling re-forms the group without rolling the pods."""

from __future__ import annotations

from typing import Any

from alchemist_operator.job_spec import parse_job_spec
from alchemist_operator.naming import JobRef
from alchemist_operator.statefulset import build_statefulset
from alchemist_operator.training_group_env import DP_PORT
from alchemist_operator.worker_env import worker_config
from alchemist_worker.distributed.settings import DataParallelSettings

JOB = JobRef(namespace="team-a", name="chat", uid="1234")
MODEL = {"path": "/models/smollm2"}


def container_env(spec: dict[str, Any]) -> tuple[dict[str, str], list[dict[str, Any]]]:
    parsed = parse_job_spec({"model": MODEL, **spec})
    config = worker_config(JOB, parsed)
    sts = build_statefulset(JOB, parsed, "alchemist:dev", config, "redis://r:6379")
    return config, sts["spec"]["template"]["spec"]["containers"][0]["env"]


def test_scaling_changes_no_setting() -> None:
    one, one_env = container_env({"replicas": 1})
    three, three_env = container_env({"replicas": 3})
    assert one == three and one_env == three_env


def test_several_replicas_form_a_group_through_the_headless_service() -> None:
    config, env = container_env({"replicas": 3})
    names = [var["name"] for var in env]
    address = next(var["value"] for var in env if var["name"] == "ALCHEMIST_DP_ADDRESS")
    # Kubernetes expands $(VAR) only from variables declared before it.
    assert names.index("ALCHEMIST_DP_ADDRESS") > names.index("ALCHEMIST_REPLICA")
    assert names.index("ALCHEMIST_DP_ADDRESS") > names.index("ALCHEMIST_NAMESPACE")
    assert address == "$(ALCHEMIST_REPLICA).chat-headless.$(ALCHEMIST_NAMESPACE).svc"
    pod = {"ALCHEMIST_DP_ADDRESS": "chat-1.chat-headless.team-a.svc"}
    settings = DataParallelSettings.from_env({**config, **pod})
    assert (
        settings is not None and settings.port == DP_PORT and settings.address == pod["ALCHEMIST_DP_ADDRESS"]
    )
    settings.check_claim_idle(60_000)  # the defaults fit the consumer's default claim idle time


def test_training_off_means_no_group() -> None:
    config, _ = container_env({"replicas": 3, "training": {"enabled": False}})
    assert "ALCHEMIST_DATA_PARALLEL" not in config
