"""The rollout state machine, decision by decision, with no Redis and no Kubernetes."""

from __future__ import annotations

import dataclasses

import pytest
from alchemist_operator.job_spec import RolloutSpec, RolloutStrategy
from alchemist_operator.rollout import (
    FeedbackCounts,
    GatePolicy,
    Observation,
    Phase,
    RolloutPolicy,
    RolloutState,
    Verdict,
    choose_canaries,
    next_candidate,
    read_gates,
    replicas_behind,
    step,
    versions_to_count,
)

REPLICAS = ("chat-0", "chat-1", "chat-2")
CANARY = RolloutPolicy(
    strategy=RolloutStrategy.CANARY,
    canary_replicas=1,
    gates=GatePolicy(min_feedback=10, max_acceptance_drop=0.1, auto_rollback=True, timeout_seconds=600),
)


def observe(now: float = 1000.0, published: tuple[int, ...] = (), **counts: FeedbackCounts) -> Observation:
    return Observation(
        now=now,
        published=published,
        live_replicas=REPLICAS,
        counts={int(k.lstrip("v")): c for k, c in counts.items()},
    )


def test_nothing_published_keeps_the_base_model() -> None:
    result = step(RolloutState(), CANARY, observe())
    assert result.state.stable == 0 and result.state.phase is Phase.IDLE
    assert result.events == ()


def test_immediate_points_every_replica_at_the_newest_version() -> None:
    policy = RolloutPolicy(strategy=RolloutStrategy.IMMEDIATE)
    result = step(RolloutState(stable=1), policy, observe(published=(1, 2, 3)))
    assert result.state.stable == 3
    assert all(result.state.version_for(r) == 3 for r in REPLICAS)
    assert [e.reason for e in result.events] == ["VersionRolledOut"]
    # Idempotent: nothing newer, nothing happens.
    again = step(result.state, policy, observe(published=(1, 2, 3)))
    assert again.state.stable == 3 and again.events == ()


def test_rejected_versions_are_never_candidates() -> None:
    state = RolloutState(stable=1, rejected=(3,))
    assert next_candidate(state, (1, 2, 3)) == 2
    assert next_candidate(state, (1, 3)) is None
    assert next_candidate(RolloutState(stable=5), (1, 2, 3)) is None


def test_canary_starts_on_the_highest_ordinals_and_snapshots_counters() -> None:
    obs = observe(published=(1,), v0=FeedbackCounts(40, 50), v1=FeedbackCounts(0, 0))
    result = step(RolloutState(), CANARY, obs)
    state = result.state
    assert state.phase is Phase.CANARY and state.candidate == 1
    assert state.canary_replicas == ("chat-2",)
    assert state.version_for("chat-2") == 1 and state.version_for("chat-0") == 0
    assert state.stable_baseline == FeedbackCounts(40, 50) and state.started_at == 1000.0
    assert [e.reason for e in result.events] == ["CanaryStarted"]


def test_canary_waits_for_a_replica_to_compare_against() -> None:
    obs = dataclasses.replace(observe(published=(1,)), live_replicas=("chat-0",))
    result = step(RolloutState(), CANARY, obs)
    assert result.state.phase is Phase.IDLE and result.events == ()
    assert "waits for 2 live replicas" in result.state.message


def start_canary() -> RolloutState:
    obs = observe(published=(1,), v0=FeedbackCounts(40, 50), v1=FeedbackCounts(0, 0))
    return step(RolloutState(), CANARY, obs).state


def test_canary_waits_until_both_sides_have_enough_feedback() -> None:
    state = start_canary()
    # The stable side's old feedback does not count: only what arrived since the canary started.
    obs = observe(now=1100, published=(1,), v0=FeedbackCounts(45, 55), v1=FeedbackCounts(20, 20))
    result = step(state, CANARY, obs)
    assert result.state.phase is Phase.CANARY and result.events == ()
    reading = read_gates(result.state, CANARY.gates, obs)
    assert reading.verdict is Verdict.WAIT
    assert reading.stable == FeedbackCounts(5, 5) and reading.canary == FeedbackCounts(20, 20)


def test_canary_is_promoted_when_acceptance_holds() -> None:
    state = start_canary()
    # stable: 8/10 since start; canary: 15/20 = 75%, a drop of 5 points, within 10.
    obs = observe(now=1200, published=(1,), v0=FeedbackCounts(48, 60), v1=FeedbackCounts(15, 20))
    result = step(state, CANARY, obs)
    assert result.state.phase is Phase.IDLE and result.state.stable == 1
    assert result.state.candidate is None and result.state.canary_replicas == ()
    assert [e.reason for e in result.events] == ["CanaryPromoted"]
    assert result.rollback_trainer_to is None


def test_canary_is_rolled_back_when_acceptance_drops() -> None:
    state = start_canary()
    # stable: 9/10 = 90%; canary: 10/20 = 50%.
    obs = observe(now=1200, published=(1,), v0=FeedbackCounts(49, 60), v1=FeedbackCounts(10, 20))
    result = step(state, CANARY, obs)
    assert result.state.phase is Phase.IDLE and result.state.stable == 0
    assert result.state.rejected == (1,)
    assert [e.type for e in result.events] == ["Warning"]
    assert result.events[0].reason == "CanaryRolledBack" and "50.0%" in result.events[0].message
    assert result.rollback_trainer_to == 0
    # The rejected version is not retried; a newer one is.
    assert step(result.state, CANARY, observe(now=1300, published=(1,))).state.phase is Phase.IDLE
    newer = step(result.state, CANARY, observe(now=1300, published=(1, 2)))
    assert newer.state.candidate == 2


def test_canary_without_enough_feedback_times_out_into_a_rollback() -> None:
    state = start_canary()
    obs = observe(now=1000 + 600, published=(1,), v0=FeedbackCounts(41, 51), v1=FeedbackCounts(1, 1))
    result = step(state, CANARY, obs)
    assert result.state.rejected == (1,)
    assert "not enough feedback within 600s" in result.events[0].message


def test_without_auto_rollback_a_failed_canary_is_held_until_a_person_decides() -> None:
    manual = dataclasses.replace(CANARY, gates=dataclasses.replace(CANARY.gates, auto_rollback=False))
    state = start_canary()
    bad = observe(now=1200, published=(1,), v0=FeedbackCounts(49, 60), v1=FeedbackCounts(10, 20))
    held = step(state, manual, bad)
    assert held.state.phase is Phase.HELD and held.state.candidate == 1
    assert [e.reason for e in held.events] == ["CanaryHeld"]
    # Held stays held, and says so only once.
    again = step(held.state, manual, bad)
    assert again.state.phase is Phase.HELD and again.events == ()
    # A person relaxes the gate: the canary is judged again and promoted.
    relaxed = dataclasses.replace(manual, gates=dataclasses.replace(manual.gates, max_acceptance_drop=0.5))
    promoted = step(again.state, relaxed, bad)
    assert promoted.state.stable == 1 and [e.reason for e in promoted.events] == ["CanaryPromoted"]


def test_switching_to_immediate_mid_canary_rolls_out_the_newest_version() -> None:
    state = start_canary()
    result = step(state, RolloutPolicy(strategy=RolloutStrategy.IMMEDIATE), observe(published=(1, 2)))
    assert result.state.phase is Phase.IDLE and result.state.stable == 2
    assert [e.reason for e in result.events] == ["CanaryAborted", "VersionRolledOut"]


def test_a_canary_whose_version_disappears_is_aborted() -> None:
    state = start_canary()
    result = step(state, CANARY, observe(published=()))
    assert result.state.phase is Phase.IDLE and result.state.stable == 0
    assert result.events[0].type == "Warning" and result.events[0].reason == "CanaryAborted"


def test_choose_canaries_orders_by_ordinal_not_by_text() -> None:
    live = tuple(f"chat-{i}" for i in range(11))
    assert choose_canaries(live, 2) == ("chat-10", "chat-9")
    assert choose_canaries(("chat-0", "chat-1"), 2) is None


def test_counters_and_helpers() -> None:
    assert FeedbackCounts(3, 4).since(FeedbackCounts(1, 2)) == FeedbackCounts(2, 2)
    assert FeedbackCounts(1, 1).since(FeedbackCounts(5, 9)) == FeedbackCounts(1, 1)  # counters were reset
    assert FeedbackCounts().acceptance is None
    with pytest.raises(ValueError, match="positive <= total"):
        FeedbackCounts(3, 2)
    with pytest.raises(ValueError, match="inconsistent"):
        RolloutState(phase=Phase.CANARY)
    state = start_canary()
    assert versions_to_count(state, (1, 2)) == (0, 1)
    assert versions_to_count(RolloutState(stable=1), (1, 2)) == (1, 2)
    assert replicas_behind(state, {"chat-0": 0, "chat-2": 0}) == {"chat-2": (0, 1)}


def test_policy_from_spec_carries_every_gate() -> None:
    spec = RolloutSpec.model_validate(
        {
            "strategy": "Canary",
            "canary": {"replicas": 2, "minFeedback": 7, "maxAcceptanceDrop": 0.2, "autoRollback": False},
        }
    )
    policy = RolloutPolicy.from_spec(spec)
    assert policy.strategy is RolloutStrategy.CANARY and policy.canary_replicas == 2
    assert policy.gates == GatePolicy(
        min_feedback=7, max_acceptance_drop=0.2, auto_rollback=False, timeout_seconds=3600
    )
