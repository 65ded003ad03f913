"""Versions the evaluation gate held: never a rollout candidate, reported once, shown in the job's status.

Pure decisions first, then the operator against kmock with a real Redis, where the trainer's published
metadata carries the gate's reading.
"""

from __future__ import annotations

from typing import Any

from alchemist_operator.job_spec import RolloutStrategy
from alchemist_operator.operator_config import OperatorConfig
from alchemist_operator.rollout import (
    GatePolicy,
    Observation,
    Phase,
    RolloutPolicy,
    RolloutState,
    next_candidate,
    step,
)
from alchemist_operator.rollout_store import read_snapshot, state_from_redis, state_to_redis
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.schemas import (
    ArtifactKind,
    EvaluationReading,
    EvaluationScores,
    GateDecision,
    VersionInfo,
)
from kmock import KubernetesEmulator

from tests.operator.conftest import eventually, job_manifest, running_operator, set_ready
from tests.operator.test_rollout_redis import (
    CANARY_SPEC,
    JOB_PATH,
    REPLICAS,
    job_status,
    reasons,
    rollout_status,
    simulated_replicas,
    store_for,
)

REPLICA_NAMES = ("chat-0", "chat-1", "chat-2")
IMMEDIATE = RolloutPolicy(strategy=RolloutStrategy.IMMEDIATE)
CANARY = RolloutPolicy(strategy=RolloutStrategy.CANARY, canary_replicas=1, gates=GatePolicy(min_feedback=5))
REASON = "perplexity 12.3 is 23.0% above base v0's 10 (bound 2.0%)"


def observe(published: tuple[int, ...], held: dict[int, str]) -> Observation:
    return Observation(now=1000.0, published=published, live_replicas=REPLICA_NAMES, held=held)


def test_held_versions_are_never_candidates() -> None:
    assert next_candidate(RolloutState(stable=1), (1, 2, 3), held={3}) == 2
    assert next_candidate(RolloutState(stable=1), (1, 2, 3), held={2, 3}) is None


def test_immediate_skips_a_held_version_and_reports_it_once() -> None:
    result = step(RolloutState(stable=1), IMMEDIATE, observe((1, 2, 3), {3: REASON}))
    assert result.state.stable == 2 and result.state.held == (3,)
    assert [(e.type, e.reason) for e in result.events] == [
        ("Warning", "VersionHeld"),
        ("Normal", "VersionRolledOut"),
    ]
    assert result.events[0].message == f"version 3 held by the evaluation gate: {REASON}"
    again = step(result.state, IMMEDIATE, observe((1, 2, 3), {3: REASON}))
    assert again.state == result.state and again.events == ()
    # A later version that passed goes out; the held one is forgotten once it is no longer published.
    later = step(again.state, IMMEDIATE, observe((2, 4), {}))
    assert later.state.stable == 4 and later.state.held == ()


def test_a_canary_never_starts_on_a_held_version() -> None:
    result = step(RolloutState(stable=1), CANARY, observe((1, 2), {2: REASON}))
    assert result.state.phase is Phase.IDLE and result.state.version_for("chat-2") == 1
    assert [e.reason for e in result.events] == ["VersionHeld"]
    canary = step(result.state, CANARY, observe((1, 2, 3), {2: REASON}))
    assert canary.state.candidate == 3 and canary.state.held == (2,)


def test_reported_held_versions_survive_the_round_trip_through_redis() -> None:
    state = RolloutState(stable=2, held=(3, 5))
    pointer, progress = state_to_redis(state)
    assert state_from_redis(pointer, progress) == state


def reading(decision: GateDecision) -> EvaluationReading:
    base = EvaluationScores(perplexity=10.0, text_tokens=100)
    ppl = 12.3 if decision is GateDecision.HELD else 10.1
    return EvaluationReading(
        set_digest="d",
        scores=EvaluationScores(perplexity=ppl, text_tokens=100),
        base=base,
        parent=0,
        parent_scores=base,
        decision=decision,
        reasons=[REASON] if decision is GateDecision.HELD else [],
    )


def publish(store: JobStore, version: int, decision: GateDecision) -> None:
    store.publish_version(
        VersionInfo(
            version=version,
            parent=version - 1,
            kind=ArtifactKind.LORA,
            path=f"/v/{version}",
            evaluation=reading(decision),
        )
    )


def test_the_snapshot_reads_the_held_versions_above_the_stable_one(redis_url: str) -> None:
    store = store_for(redis_url)
    publish(store, 1, GateDecision.HELD)
    publish(store, 2, GateDecision.PASSED)
    publish(store, 3, GateDecision.HELD)
    snapshot = read_snapshot(store, store.keys.feedback, 1000.0)
    assert snapshot.observation.held == {1: REASON, 3: REASON}
    assert store.latest_servable_version() == 2


def conditions(kube: KubernetesEmulator) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in job_status(kube).get("conditions", [])}


async def test_a_held_version_is_never_rolled_out_and_shows_in_status_and_events(
    kube: KubernetesEmulator, operator_config: OperatorConfig, redis_url: str
) -> None:
    store = store_for(redis_url)
    await kube.post(JOB_PATH, json=job_manifest(replicas=3))
    async with simulated_replicas(store), running_operator(operator_config):
        await set_ready(kube, 3, 3)
        publish(store, 1, GateDecision.PASSED)
        await eventually(lambda: job_status(kube).get("replicaVersions") == dict.fromkeys(REPLICAS, 1))
        publish(store, 2, GateDecision.HELD)
        await eventually(lambda: "VersionHeld" in reasons(kube), what="a VersionHeld event")
        await eventually(
            lambda: rollout_status(kube).get("heldVersions") == [2], what="held versions in status"
        )
        status = job_status(kube)
        assert status["currentVersion"] == 1 and status["targetVersion"] == 1
        assert rollout_status(kube)["heldReason"] == f"version 2: {REASON}"
        rollout = conditions(kube)["RolloutProgressing"]
        assert rollout["reason"] == "VersionHeld" and REASON in rollout["message"]
        assert store.get_rollout().stable_version == 1
        assert set(job_status(kube)["replicaVersions"].values()) == {1}
        # In canary mode too, the next version that passes is the one tried.
        await kube.patch(f"{JOB_PATH}/chat", json={"spec": CANARY_SPEC})
        await eventually(lambda: rollout_status(kube).get("strategy") == "Canary")
        publish(store, 3, GateDecision.PASSED)
        await eventually(lambda: rollout_status(kube).get("canaryVersion") == 3, what="canary of version 3")
        assert reasons(kube).count("VersionHeld") == 1
