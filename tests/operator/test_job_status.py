"""The pure status function: phases, Kubernetes-style conditions and the merge patch that writes them."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from alchemist_operator.conditions import Condition, merge_conditions
from alchemist_operator.job_spec import parse_job_spec
from alchemist_operator.job_status import (
    Blocker,
    ReconcileOutcome,
    RedisView,
    StatusInputs,
    WorkloadView,
    status_patch,
)
from alchemist_operator.job_status import compute_status as compute
from alchemist_operator.naming import JobRef
from alchemist_operator.rollout import FeedbackCounts, GateReading, Phase, RolloutState, Verdict

JOB = JobRef("team-a", "chat", "uid")
CRD = yaml.safe_load(
    (Path(__file__).resolve().parents[2] / "crds" / "continuallearningjobs.alchemist.dev.yaml").read_text()
)
STATUS_SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]


def compute_status(inputs: StatusInputs) -> dict[str, Any]:
    """The status function, plus the check the API server makes: a status off the CRD's schema is refused."""
    status = compute(inputs)
    jsonschema.Draft4Validator(STATUS_SCHEMA, format_checker=jsonschema.FormatChecker()).validate(status)
    return status


T0 = datetime.datetime(2030, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(minutes=5)


def inputs(**changes: Any) -> StatusInputs:
    base = StatusInputs(
        job=JOB,
        spec=parse_job_spec({"model": {"path": "/m"}, "replicas": 2}),
        outcome=ReconcileOutcome(generation=3),
        workload=WorkloadView(replicas=2, ready_replicas=2, updated_replicas=2),
        redis=RedisView(
            reachable=True,
            state=RolloutState(stable=4),
            published=(1, 2, 3, 4),
            replica_versions={"chat-0": 4, "chat-1": 4},
            feedback_lag=7,
        ),
        feedback_stream="alchemist:team-a:chat:feedback",
        previous={},
        now=T0,
    )
    return dataclasses.replace(base, **changes)


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_a_healthy_job_is_running_with_every_condition_reported() -> None:
    status = compute_status(inputs())
    assert status["phase"] == "Running"
    assert conditions(status) == {
        "Valid": ("True", "SpecAccepted"),
        "Reconciled": ("True", "ChildrenApplied"),
        "Ready": ("True", "ReplicasReady"),
        "FeedbackConnected": ("True", "RedisReachable"),
        "RolloutProgressing": ("False", "RolloutComplete"),
        "VolumesBound": ("True", "ClaimsBound"),
        "ModelAvailable": ("True", "ModelInPlace"),
    }
    assert status["observedGeneration"] == 3
    assert all(
        c["observedGeneration"] == 3 and c["lastTransitionTime"] == "2030-01-01T12:00:00Z"
        for c in status["conditions"]
    )
    assert status["replicas"] == 2 and status["readyReplicas"] == 2
    assert status["currentVersion"] == 4 and status["targetVersion"] == 4
    assert status["feedbackLag"] == 7 and status["replicaVersions"] == {"chat-0": 4, "chat-1": 4}
    assert status["selector"] == JOB.selector()


@pytest.mark.parametrize(
    ("changes", "phase", "condition", "expected"),
    [
        (
            {"outcome": ReconcileOutcome(3, "spec.replicas: bad")},
            "Invalid",
            "Valid",
            ("False", "InvalidSpec"),
        ),
        ({"outcome": None}, "Pending", "Valid", ("Unknown", "Reconciling")),
        ({"workload": WorkloadView(2, 0, 2)}, "Pending", "Ready", ("False", "ReplicasNotReady")),
        ({"workload": WorkloadView(2, 1, 1)}, "Progressing", "Ready", ("False", "ReplicasNotReady")),
        (
            {"redis": RedisView(reachable=False, error="connection refused")},
            "Degraded",
            "FeedbackConnected",
            ("False", "RedisUnreachable"),
        ),
        ({"redis": None}, "Running", "FeedbackConnected", ("Unknown", "NotChecked")),
    ],
)
def test_phases_and_conditions(
    changes: dict[str, Any], phase: str, condition: str, expected: tuple[str, str]
) -> None:
    status = compute_status(inputs(**changes))
    assert status["phase"] == phase
    assert conditions(status)[condition] == expected


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"outcome": ReconcileOutcome(3, "spec.replicas: bad")}, "InvalidSpec"),
        ({"outcome": None}, "Reconciling"),
        ({"generation": 4}, "Reconciling"),  # a newer spec than the one applied
        (
            {"outcome": ReconcileOutcome(3, blockers=(Blocker("SecretNotFound", "Secret k is missing"),))},
            "SecretNotFound",
        ),
        ({"workload": None}, "StatefulSetMissing"),
        ({"workload": WorkloadView(2, 2, 2, failing=("chat-1: CrashLoopBackOff",))}, "WorkersFailing"),
        ({"workload": WorkloadView(2, 2, 1)}, "ReplicasNotReady"),  # ready, but one runs the old template
    ],
)
def test_ready_is_false_unless_valid_reconciled_and_every_replica_ready(
    changes: dict[str, Any], reason: str
) -> None:
    status = compute_status(inputs(**changes))
    assert conditions(status)["Ready"] == ("False", reason)


def test_scaled_to_zero_is_ready_only_once_reconciled() -> None:
    spec = parse_job_spec({"model": {"path": "/m"}, "replicas": 0})
    idle = WorkloadView(0, 0, 0)
    assert conditions(compute_status(inputs(spec=spec, workload=idle)))["Ready"] == ("True", "ScaledToZero")
    invalid = inputs(spec=spec, workload=idle, outcome=ReconcileOutcome(3, "bad"))
    assert conditions(compute_status(invalid))["Ready"] == ("False", "InvalidSpec")
    assert conditions(compute_status(inputs(spec=spec, workload=idle, outcome=None)))["Ready"][0] == "False"


def test_a_blocker_degrades_the_job_and_names_every_problem() -> None:
    blockers = (Blocker("SecretNotFound", "Secret a is missing"), Blocker("Forbidden", "HTTP 403"))
    status = compute_status(inputs(outcome=ReconcileOutcome(3, blockers=blockers)))
    assert status["phase"] == "Degraded"
    reconciled = next(c for c in status["conditions"] if c["type"] == "Reconciled")
    assert (reconciled["status"], reconciled["reason"]) == ("False", "SecretNotFound")
    assert reconciled["message"] == "Secret a is missing; HTTP 403"


def test_suspended_job() -> None:
    spec = parse_job_spec({"model": {"path": "/m"}, "replicas": 2, "suspend": True})
    status = compute_status(inputs(spec=spec, workload=WorkloadView(0, 0, 0)))
    assert status["phase"] == "Suspended"
    assert conditions(status)["Ready"] == ("False", "Suspended")


def test_a_version_still_loading_is_progress() -> None:
    redis = RedisView(
        reachable=True,
        state=RolloutState(stable=5),
        published=(5,),
        replica_versions={"chat-0": 5, "chat-1": 4},
    )
    status = compute_status(inputs(redis=redis))
    assert status["phase"] == "Progressing"
    cond = next(c for c in status["conditions"] if c["type"] == "RolloutProgressing")
    assert (cond["status"], cond["reason"]) == ("True", "VersionLoading")
    assert "chat-1 has 4, wants 5" in cond["message"]


def test_a_canary_shows_its_gate_readings() -> None:
    state = RolloutState(
        stable=1,
        phase=Phase.CANARY,
        candidate=2,
        canary_replicas=("chat-1",),
        started_at=T0.timestamp(),
        message="evaluating",
    )
    gate = GateReading(Verdict.WAIT, canary=FeedbackCounts(3, 4), stable=FeedbackCounts(9, 10), summary="")
    redis = RedisView(
        reachable=True, state=state, published=(1, 2), replica_versions={"chat-0": 1, "chat-1": 2}, gate=gate
    )
    status = compute_status(inputs(redis=redis))
    assert status["phase"] == "Progressing"
    assert status["currentVersion"] == 1 and status["targetVersion"] == 2
    assert status["rollout"] == {
        "phase": "Canary",
        "strategy": "Immediate",
        "stableVersion": 1,
        "canaryVersion": 2,
        "canaryReplicas": ["chat-1"],
        "startedAt": "2030-01-01T12:00:00Z",
        "rejectedVersions": [],
        "message": "evaluating",
        "canaryFeedback": 4,
        "canaryAcceptance": 0.75,
        "stableFeedback": 10,
        "stableAcceptance": 0.9,
    }
    held = dataclasses.replace(state, phase=Phase.HELD, message="held: drop")
    status = compute_status(inputs(redis=dataclasses.replace(redis, state=held)))
    assert status["phase"] == "Degraded"
    assert conditions(status)["RolloutProgressing"] == ("False", "CanaryHeld")


def test_versions_survive_a_redis_outage_in_the_status() -> None:
    before = compute_status(inputs())
    during = compute_status(
        inputs(redis=RedisView(reachable=False, error="timeout"), previous=before, now=T1)
    )
    assert during["currentVersion"] == 4 and during["rollout"] == before["rollout"]


def test_transition_time_moves_only_when_the_status_changes() -> None:
    first = compute_status(inputs())
    same = compute_status(inputs(previous=first, now=T1))
    assert same["conditions"] == first["conditions"]
    degraded = compute_status(inputs(previous=first, now=T1, workload=WorkloadView(2, 1, 2)))
    times = {c["type"]: c["lastTransitionTime"] for c in degraded["conditions"]}
    assert times["Ready"] == "2030-01-01T12:05:00Z" and times["Valid"] == "2030-01-01T12:00:00Z"


def test_merge_conditions_drops_types_no_longer_reported() -> None:
    previous = [{"type": "Old", "status": "True", "reason": "X", "lastTransitionTime": "t"}]
    merged = merge_conditions(previous, [Condition("Ready", "True", "Fine")], T0, None)
    assert [c["type"] for c in merged] == ["Ready"] and "observedGeneration" not in merged[0]
    with pytest.raises(ValueError, match="CamelCase"):
        Condition("Ready", "True", "not camel")
    with pytest.raises(ValueError, match="True, False or Unknown"):
        Condition("Ready", "yes", "Fine")


def test_status_patch_deletes_what_disappeared_and_sends_only_changes() -> None:
    old = {
        "phase": "Running",
        "rollout": {"phase": "Canary", "canaryVersion": 2},
        "replicaVersions": {"chat-0": 1, "chat-1": 2},
    }
    new = {"phase": "Running", "rollout": {"phase": "Idle"}, "replicaVersions": {"chat-0": 2}}
    assert status_patch(old, new) == {
        "rollout": {"phase": "Idle", "canaryVersion": None},
        "replicaVersions": {"chat-0": 2, "chat-1": None},
    }
    assert status_patch(new, new) == {}
