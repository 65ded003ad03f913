"""The job's status, computed by one pure function from everything the operator observed.

One writer (the job's monitor) writes the whole status each time it changes, so conditions never race. Phases,
from the most to the least pressing: Invalid, Suspended, Pending, Degraded, Progressing, Running.

`Ready` is what `kubectl wait --for=condition=Ready` relies on: True only when the spec is valid, this generation
of it was applied without a blocker, no worker is failing, and every requested replica is ready and updated.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from alchemist_protocol.training_group import GroupRecord

from alchemist_operator.conditions import FALSE, TRUE, UNKNOWN, Condition, merge_conditions, timestamp
from alchemist_operator.job_spec import JobSpec
from alchemist_operator.naming import JobRef
from alchemist_operator.rollout import GateReading, Phase, RolloutState, next_candidate, replicas_behind
from alchemist_operator.workload_health import ModelFetch

VALID, READY, FEEDBACK, ROLLOUT = "Valid", "Ready", "FeedbackConnected", "RolloutProgressing"
VOLUMES, MODEL = "VolumesBound", "ModelAvailable"
RECONCILED = "Reconciled"


@dataclass(frozen=True)
class Blocker:
    """Something outside the spec that keeps the job from working; `reason` is CamelCase for conditions."""

    reason: str
    message: str


@dataclass(frozen=True)
class ReconcileOutcome:
    """What the last reconcile of the spec did: applied the children, found the spec invalid (`problem`), or
    could not finish for a reason outside the spec (`blockers`: a missing Secret, a refused request)."""

    generation: int | None
    problem: str | None = None
    blockers: tuple[Blocker, ...] = ()


@dataclass(frozen=True)
class WorkloadView:
    """The StatefulSet's own status."""

    replicas: int = 0
    ready_replicas: int = 0
    updated_replicas: int = 0
    failing: tuple[str, ...] = ()  # why worker pods fail to start or keep crashing, one line per pod
    unbound_claims: tuple[str, ...] = ()  # the job's claims that do not bind (workload_health.py)
    model_fetch: ModelFetch = field(default_factory=ModelFetch)


@dataclass(frozen=True)
class RedisView:
    reachable: bool
    error: str = ""
    state: RolloutState | None = None
    published: tuple[int, ...] = ()
    replica_versions: Mapping[str, int] = field(default_factory=dict)
    feedback_lag: int | None = None
    gate: GateReading | None = None
    held: Mapping[int, str] = field(default_factory=dict)  # versions the evaluation gate held -> its reasons
    training_group: GroupRecord | None = None  # the data-parallel group's current generation


@dataclass(frozen=True)
class StatusInputs:
    job: JobRef
    spec: JobSpec | None  # the last valid spec; None before any was seen
    outcome: ReconcileOutcome | None  # None until the first reconcile of this operator finished
    workload: WorkloadView | None  # None while the StatefulSet does not exist
    redis: RedisView | None  # None when Redis was not looked at
    feedback_stream: str
    previous: Mapping[str, Any]  # the status as it is now
    now: datetime.datetime
    generation: int | None = None  # the job's metadata.generation now; None: take the outcome's as current


def _valid(outcome: ReconcileOutcome | None) -> Condition:
    if outcome is None:
        return Condition(VALID, UNKNOWN, "Reconciling", "the operator has not reconciled this spec yet")
    if outcome.problem:
        return Condition(VALID, FALSE, "InvalidSpec", outcome.problem)
    return Condition(VALID, TRUE, "SpecAccepted", "the children match the spec")


def _desired(spec: JobSpec | None, workload: WorkloadView | None) -> int:
    if spec is not None:
        return 0 if spec.suspend else spec.replicas
    return workload.replicas if workload else 0


def _reconciled(outcome: ReconcileOutcome | None) -> Condition:
    if outcome is None:
        return Condition(RECONCILED, UNKNOWN, "Reconciling", "the operator has not reconciled this spec yet")
    if outcome.problem:
        return Condition(RECONCILED, FALSE, "InvalidSpec", "an invalid spec is not applied")
    if outcome.blockers:
        first = outcome.blockers[0]
        return Condition(RECONCILED, FALSE, first.reason, "; ".join(b.message for b in outcome.blockers))
    return Condition(RECONCILED, TRUE, "ChildrenApplied", "every child matches the spec")


def _ready(inputs: StatusInputs, desired: int) -> Condition:
    spec, outcome, workload = inputs.spec, inputs.outcome, inputs.workload
    if outcome is None:
        return Condition(READY, FALSE, "Reconciling", "the operator has not reconciled this spec yet")
    if outcome.problem:
        return Condition(READY, FALSE, "InvalidSpec", "the spec is invalid; see the Valid condition")
    if (
        inputs.generation is not None
        and outcome.generation is not None
        and outcome.generation < inputs.generation
    ):
        return Condition(
            READY, FALSE, "Reconciling", f"generation {inputs.generation} of the spec is not applied yet"
        )
    if outcome.blockers:
        return Condition(
            READY, FALSE, outcome.blockers[0].reason, "; ".join(b.message for b in outcome.blockers)
        )
    if spec is not None and spec.suspend:
        return Condition(
            READY, FALSE, "Suspended", "suspended: scaled to zero, versions and feedback are kept"
        )
    if workload is None:
        return Condition(READY, FALSE, "StatefulSetMissing", "the job's StatefulSet does not exist")
    if workload.failing:
        return Condition(READY, FALSE, "WorkersFailing", "; ".join(workload.failing))
    if workload.unbound_claims:
        return Condition(READY, FALSE, "VolumeNotBound", "; ".join(workload.unbound_claims))
    if desired == 0:
        return Condition(READY, TRUE, "ScaledToZero", "no replicas requested")
    ready = min(workload.ready_replicas, workload.updated_replicas)
    if ready >= desired:
        return Condition(READY, TRUE, "ReplicasReady", f"{ready}/{desired} replicas ready")
    return Condition(READY, FALSE, "ReplicasNotReady", f"{ready}/{desired} replicas ready")


def _volumes(workload: WorkloadView | None) -> Condition:
    if workload is None:
        return Condition(VOLUMES, UNKNOWN, "StatefulSetMissing", "the job's StatefulSet does not exist")
    if workload.unbound_claims:
        return Condition(VOLUMES, FALSE, "ClaimPending", "; ".join(workload.unbound_claims))
    return Condition(VOLUMES, TRUE, "ClaimsBound", "every claim of the job is bound, or none is pending")


def _model(workload: WorkloadView | None) -> Condition:
    if workload is None:
        return Condition(MODEL, UNKNOWN, "StatefulSetMissing", "the job's StatefulSet does not exist")
    fetch = workload.model_fetch
    if fetch.failed:
        return Condition(MODEL, FALSE, "FetchFailed", "; ".join(fetch.failed))
    if fetch.fetching:
        return Condition(MODEL, FALSE, "Fetching", "; ".join(fetch.fetching))
    return Condition(MODEL, TRUE, "ModelInPlace", "no pod is waiting for its model")


def _feedback(redis: RedisView | None) -> Condition:
    if redis is None:
        return Condition(FEEDBACK, UNKNOWN, "NotChecked", "Redis was not checked yet")
    if redis.reachable:
        return Condition(
            FEEDBACK, TRUE, "RedisReachable", "feedback, versions and replica state are readable"
        )
    return Condition(FEEDBACK, FALSE, "RedisUnreachable", redis.error or "Redis did not answer")


def _rollout(redis: RedisView | None) -> Condition:
    if redis is None or not redis.reachable or redis.state is None:
        return Condition(ROLLOUT, UNKNOWN, "RolloutUnknown", "rollout state is not readable")
    state = redis.state
    if state.phase is Phase.CANARY:
        return Condition(ROLLOUT, TRUE, "CanaryInProgress", state.message)
    if state.phase is Phase.HELD:
        return Condition(ROLLOUT, FALSE, "CanaryHeld", state.message)
    newest = max(redis.published, default=0)
    if newest in redis.held and newest > state.stable:
        message = f"version {newest} held by the evaluation gate: {redis.held[newest]}"
        return Condition(ROLLOUT, FALSE, "VersionHeld", message)
    behind = replicas_behind(state, redis.replica_versions)
    if behind:
        detail = ", ".join(f"{name} has {have}, wants {want}" for name, (have, want) in behind.items())
        return Condition(ROLLOUT, TRUE, "VersionLoading", detail)
    return Condition(
        ROLLOUT, FALSE, "RolloutComplete", state.message or f"every replica serves version {state.stable}"
    )


def _phase(conditions: dict[str, Condition], spec: JobSpec | None, desired: int, ready: int) -> str:
    if conditions[VALID].status == FALSE:
        return "Invalid"
    if spec is not None and spec.suspend:
        return "Suspended"
    if conditions[RECONCILED].status == FALSE or conditions[READY].reason == "WorkersFailing":
        return "Degraded"
    if conditions[VALID].status == UNKNOWN or (desired > 0 and ready == 0):
        return "Pending"
    if conditions[FEEDBACK].status == FALSE or conditions[ROLLOUT].reason == "CanaryHeld":
        return "Degraded"
    if ready < desired or conditions[ROLLOUT].status == TRUE:
        return "Progressing"
    return "Running"


def _rollout_block(spec: JobSpec | None, redis: RedisView) -> dict[str, Any]:
    state = redis.state
    assert state is not None
    block: dict[str, Any] = {
        "phase": state.phase.value,
        "stableVersion": state.stable,
        "rejectedVersions": list(state.rejected),
        "message": state.message,
    }
    if redis.held:
        newest = max(redis.held)
        block["heldVersions"] = sorted(redis.held)
        block["heldReason"] = f"version {newest}: {redis.held[newest]}"
    if spec is not None:
        block["strategy"] = spec.rollout.strategy.value
    if state.candidate is not None:
        block["canaryVersion"] = state.candidate
        block["canaryReplicas"] = list(state.canary_replicas)
    if state.started_at is not None:
        block["startedAt"] = timestamp(datetime.datetime.fromtimestamp(state.started_at, datetime.UTC))
    if redis.gate is not None:
        block["canaryFeedback"] = redis.gate.canary.total
        block["stableFeedback"] = redis.gate.stable.total
        if redis.gate.canary.acceptance is not None:
            block["canaryAcceptance"] = round(redis.gate.canary.acceptance, 4)
        if redis.gate.stable.acceptance is not None:
            block["stableAcceptance"] = round(redis.gate.stable.acceptance, 4)
    return block


def compute_status(inputs: StatusInputs) -> dict[str, Any]:
    spec, workload, redis = inputs.spec, inputs.workload, inputs.redis
    desired = _desired(spec, workload)
    ready = workload.ready_replicas if workload else 0
    conditions = {
        VALID: _valid(inputs.outcome),
        RECONCILED: _reconciled(inputs.outcome),
        READY: _ready(inputs, desired),
        FEEDBACK: _feedback(redis),
        ROLLOUT: _rollout(redis),
        VOLUMES: _volumes(workload),
        MODEL: _model(workload),
    }
    generation = inputs.outcome.generation if inputs.outcome else None
    status: dict[str, Any] = {
        "phase": _phase(conditions, spec, desired, ready),
        "conditions": merge_conditions(
            inputs.previous.get("conditions") or [], conditions.values(), inputs.now, generation
        ),
        "replicas": workload.replicas if workload else 0,
        "readyReplicas": ready,
        "selector": inputs.job.selector(),
        "feedbackStream": inputs.feedback_stream,
    }
    if generation is not None:
        status["observedGeneration"] = generation
    if redis is not None and redis.reachable and redis.state is not None:
        state = redis.state
        status["currentVersion"] = state.stable
        target = (
            state.candidate
            if state.candidate is not None
            else next_candidate(state, redis.published, redis.held)
        )
        status["targetVersion"] = target if target is not None else state.stable
        status["replicaVersions"] = dict(sorted(redis.replica_versions.items()))
        status["rollout"] = _rollout_block(spec, redis)
        if redis.feedback_lag is not None:
            status["feedbackLag"] = redis.feedback_lag
        if redis.training_group is not None:
            group = redis.training_group
            status["trainingGroup"] = {
                "generation": group.generation,
                "size": group.world_size,
                "members": list(group.members),
            }
    else:
        # Keep the last known versions rather than blanking them while Redis is away.
        for key in (
            "currentVersion",
            "targetVersion",
            "replicaVersions",
            "rollout",
            "feedbackLag",
            "trainingGroup",
        ):
            if key in inputs.previous:
                status[key] = inputs.previous[key]
    return status


def status_patch(previous: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch from `previous` to `new`: keys that disappeared are set to None (deleted)."""
    patch: dict[str, Any] = {}
    for key, value in new.items():
        old = previous.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            nested = status_patch(old, value)
            if nested:
                patch[key] = nested
        elif old != value:
            patch[key] = value
    for key in previous:
        if key not in new:
            patch[key] = None
    return patch
