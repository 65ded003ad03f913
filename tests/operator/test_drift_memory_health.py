"""The pure parts of failure handling: what counts as drift, when a Redis pointer would rewind versions, and
why a worker pod fails."""

from __future__ import annotations

from typing import Any

from alchemist_operator.children import desired_children
from alchemist_operator.drift import drift
from alchemist_operator.job_spec import parse_job_spec
from alchemist_operator.naming import JobRef
from alchemist_operator.operator_config import OperatorConfig
from alchemist_operator.pod_health import pod_problems
from alchemist_operator.rollout import RolloutState
from alchemist_operator.rollout_memory import remembered_state, restored_state, rewind_reason
from alchemist_operator.statefulset import STATEFULSET_IMMUTABLE

JOB = JobRef("team-a", "chat", "uid")
CONFIG = OperatorConfig(worker_image="w:1", default_redis_url="redis://r:6379/0")


def statefulset() -> dict[str, Any]:
    built = desired_children(JOB, parse_job_spec({"model": {"path": "/m"}, "replicas": 2}), CONFIG)
    return next(m for m in built if m["kind"] == "StatefulSet")


def live_copy(desired: dict[str, Any]) -> dict[str, Any]:
    """What the API server returns: our fields, its defaults and status, quantities in canonical form."""
    import copy

    live = copy.deepcopy(desired)
    live["metadata"] |= {
        "uid": "x",
        "resourceVersion": "9",
        "labels": {**desired["metadata"]["labels"], "extra": "1"},
    }
    live["spec"]["revisionHistoryLimit"] = 10
    live["status"] = {"replicas": 2}
    container = live["spec"]["template"]["spec"]["containers"][0]
    container["terminationMessagePath"] = "/dev/termination-log"
    container["resources"]["requests"]["cpu"] = "4000m"  # same quantity, other spelling
    return live


def test_server_defaults_and_canonical_quantities_are_not_drift() -> None:
    desired = statefulset()
    assert drift(desired, live_copy(desired), STATEFULSET_IMMUTABLE) == []


def test_hand_edits_to_owned_fields_are_drift_but_immutable_ones_are_left_alone() -> None:
    desired = statefulset()
    live = live_copy(desired)
    live["spec"]["replicas"] = 7
    live["spec"]["template"]["spec"]["containers"][0]["image"] = "other:2"
    del live["metadata"]["ownerReferences"]
    live["spec"]["serviceName"] = "renamed"  # immutable: recreating is the spec handler's call
    assert drift(desired, live, STATEFULSET_IMMUTABLE) == [
        "spec.replicas",
        "spec.template.spec.containers[0].image",
        "metadata.ownerReferences",
    ]


def test_a_redis_without_pointer_or_with_an_older_one_would_rewind() -> None:
    remembered = remembered_state({"rollout": {"stableVersion": 5, "rejectedVersions": [3]}})
    assert remembered == RolloutState(stable=5, rejected=(3,))
    empty = RolloutState()
    assert "Redis has no rollout pointer" in (rewind_reason(empty, False, remembered, None) or "")
    older = RolloutState(stable=2)
    assert "older than version 5" in (rewind_reason(older, True, remembered, None) or "")
    # A rollback command in Redis naming that version makes the older pointer deliberate.
    assert rewind_reason(older, True, remembered, rollback_to=2) is None
    assert rewind_reason(RolloutState(stable=6), True, remembered, None) is None
    assert rewind_reason(RolloutState(stable=5), True, remembered, None) is None
    restored = restored_state(RolloutState(rejected=(7,)), remembered)
    assert (restored.stable, restored.rejected) == (5, (3, 7))


def test_nothing_to_restore_for_a_new_job() -> None:
    assert remembered_state({}) is None
    assert rewind_reason(RolloutState(), False, None, None) is None
    at_base = remembered_state({"rollout": {"stableVersion": 0}})
    assert rewind_reason(RolloutState(), False, at_base, None) is None


def pod(name: str, *statuses: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"containerStatuses": list(statuses)}}


def test_pod_problems() -> None:
    config_error = {
        "ready": False,
        "state": {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "keys" not found'}},
    }
    crashed = {
        "ready": False,
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {
            "terminated": {"exitCode": 1, "message": "x" * 1000 + "\nmodel path /m does not exist\n"}
        },
    }
    recovered = {  # crashed once, ready now: fine
        "ready": True,
        "state": {"running": {}},
        "lastState": {"terminated": {"exitCode": 1}},
    }
    starting = {"ready": False, "state": {"waiting": {"reason": "ContainerCreating"}}}
    found = pod_problems(
        [
            pod("chat-1", crashed),
            pod("chat-0", config_error),
            pod("chat-2", recovered),
            pod("chat-3", starting),
        ]
    )
    assert found[0] == 'chat-0: CreateContainerConfigError, secret "keys" not found'
    assert found[1].startswith("chat-1: CrashLoopBackOff, exit code 1: ...")
    assert found[1].endswith("model path /m does not exist") and len(found[1]) < 400
    assert len(found) == 2
