"""The rollout state machine: which version each replica serves, decided from what Redis shows.

Pure: `step(state, policy, observation)` returns the next state and the events to record, and touches nothing.
The operator reads an `Observation` from Redis, calls `step`, writes the state back (the rollout pointer is the
part workers follow) and posts the events.

Immediate: the newest published version that was never rejected becomes the stable version of every replica.
Canary: that version goes to `canary_replicas` replicas first; feedback on the canary's responses is compared
with feedback on the stable version's responses over the same period, and the canary is promoted (every replica
moves to it), rolled back (it is rejected and never tried again), or held for a person to decide.
Version 0 is the base model. Versions the evaluation gate held (the trainer judged them on the job's evaluation set
before publishing them) are never candidates: each is reported once, with the gate's reasons, and skipped.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from alchemist_operator.job_spec import RolloutSpec, RolloutStrategy


@dataclass(frozen=True)
class FeedbackCounts:
    """Cumulative feedback on one version's responses: accepted (positive) and all labelled."""

    positive: int = 0
    total: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.positive <= self.total:
            raise ValueError(f"need 0 <= positive <= total, got {self.positive} of {self.total}")

    def since(self, baseline: FeedbackCounts) -> FeedbackCounts:
        """What arrived after `baseline` was taken (counters only grow; a reset counts from zero)."""
        if self.total < baseline.total or self.positive < baseline.positive:
            return self
        return FeedbackCounts(self.positive - baseline.positive, self.total - baseline.total)

    @property
    def acceptance(self) -> float | None:
        return self.positive / self.total if self.total else None


@dataclass(frozen=True)
class GatePolicy:
    min_feedback: int = 50
    max_acceptance_drop: float = 0.05
    auto_rollback: bool = True
    timeout_seconds: float = 3600.0


@dataclass(frozen=True)
class RolloutPolicy:
    strategy: RolloutStrategy = RolloutStrategy.IMMEDIATE
    canary_replicas: int = 1
    gates: GatePolicy = field(default_factory=GatePolicy)

    @classmethod
    def from_spec(cls, spec: RolloutSpec) -> RolloutPolicy:
        canary = spec.canary
        return cls(
            strategy=spec.strategy,
            canary_replicas=canary.replicas,
            gates=GatePolicy(
                min_feedback=canary.min_feedback,
                max_acceptance_drop=canary.max_acceptance_drop,
                auto_rollback=canary.auto_rollback,
                timeout_seconds=float(canary.timeout_seconds),
            ),
        )


class Phase(enum.StrEnum):
    IDLE = "Idle"
    CANARY = "Canary"
    HELD = "Held"  # a canary failed its gates (or timed out) and automatic rollback is off


@dataclass(frozen=True)
class RolloutState:
    stable: int = 0
    phase: Phase = Phase.IDLE
    candidate: int | None = None
    canary_replicas: tuple[str, ...] = ()
    started_at: float | None = None
    stable_baseline: FeedbackCounts = FeedbackCounts()
    canary_baseline: FeedbackCounts = FeedbackCounts()
    rejected: tuple[int, ...] = ()
    message: str = ""
    held: tuple[int, ...] = ()  # versions the evaluation gate held that were already reported

    def __post_init__(self) -> None:
        in_canary = self.phase is not Phase.IDLE
        if in_canary != (self.candidate is not None) or in_canary != bool(self.canary_replicas):
            raise ValueError(
                f"inconsistent rollout state: phase {self.phase} with candidate {self.candidate}"
            )

    def version_for(self, replica: str) -> int:
        if self.candidate is not None and replica in self.canary_replicas:
            return self.candidate
        return self.stable


@dataclass(frozen=True)
class Observation:
    now: float
    published: tuple[int, ...]  # published version numbers
    live_replicas: tuple[str, ...]  # replicas whose heartbeat is fresh and that report ready
    counts: Mapping[int, FeedbackCounts] = field(default_factory=dict)  # cumulative, per version
    held: Mapping[int, str] = field(default_factory=dict)  # versions the evaluation gate held -> its reasons

    def counts_for(self, version: int) -> FeedbackCounts:
        return self.counts.get(version, FeedbackCounts())


@dataclass(frozen=True)
class RolloutEvent:
    type: str  # "Normal" or "Warning", as Kubernetes Events have it
    reason: str
    message: str


@dataclass(frozen=True)
class StepResult:
    state: RolloutState
    events: tuple[RolloutEvent, ...] = ()
    rollback_trainer_to: int | None = None  # after a rollback: the version the trainer must continue from


class Verdict(enum.StrEnum):
    WAIT = "Wait"
    PROMOTE = "Promote"
    FAIL = "Fail"
    TIMEOUT = "Timeout"


@dataclass(frozen=True)
class GateReading:
    verdict: Verdict
    canary: FeedbackCounts
    stable: FeedbackCounts
    summary: str


def next_candidate(state: RolloutState, published: tuple[int, ...], held: Collection[int] = ()) -> int | None:
    """The newest published version above the stable one that was never rejected nor held by the gate."""
    eligible = [v for v in published if v > state.stable and v not in state.rejected and v not in held]
    return max(eligible) if eligible else None


def versions_to_count(
    state: RolloutState, published: tuple[int, ...], held: Collection[int] = ()
) -> tuple[int, ...]:
    """The versions whose feedback counters `step` may read: stable, and the current or next candidate."""
    candidate = state.candidate if state.candidate is not None else next_candidate(state, published, held)
    return (state.stable,) if candidate is None else (state.stable, candidate)


def _rate(counts: FeedbackCounts) -> str:
    return "n/a" if counts.acceptance is None else f"{counts.acceptance:.1%}"


def read_gates(state: RolloutState, gates: GatePolicy, observation: Observation) -> GateReading:
    """Judges the canary on feedback that arrived since it started, for both sides."""
    if state.candidate is None or state.started_at is None:
        raise ValueError("gates can only be read while a canary is in progress")
    canary = observation.counts_for(state.candidate).since(state.canary_baseline)
    stable = observation.counts_for(state.stable).since(state.stable_baseline)
    summary = (
        f"canary v{state.candidate}: {_rate(canary)} accepted of {canary.total}, "
        f"stable v{state.stable}: {_rate(stable)} accepted of {stable.total} "
        f"(need {gates.min_feedback} each, max drop {gates.max_acceptance_drop:.1%})"
    )
    if canary.total >= gates.min_feedback and stable.total >= gates.min_feedback:
        assert canary.acceptance is not None and stable.acceptance is not None
        drop = stable.acceptance - canary.acceptance
        verdict = Verdict.PROMOTE if drop <= gates.max_acceptance_drop + 1e-12 else Verdict.FAIL
        return GateReading(verdict, canary, stable, summary)
    if observation.now - state.started_at >= gates.timeout_seconds:
        return GateReading(Verdict.TIMEOUT, canary, stable, summary)
    return GateReading(Verdict.WAIT, canary, stable, summary)


def choose_canaries(live_replicas: tuple[str, ...], count: int) -> tuple[str, ...] | None:
    """The `count` live replicas with the highest ordinals, or None when fewer than count + 1 are live.

    One live replica must stay on the stable version, or there is nothing to compare the canary with.
    """
    if len(live_replicas) < count + 1:
        return None

    def ordinal(name: str) -> tuple[int, str]:
        tail = name.rsplit("-", 1)[-1]
        return (int(tail) if tail.isdigit() else -1, name)

    return tuple(sorted(sorted(live_replicas, key=ordinal)[-count:]))


def _idle(state: RolloutState, message: str, **changes: object) -> RolloutState:
    return dataclasses.replace(
        state,
        phase=Phase.IDLE,
        candidate=None,
        canary_replicas=(),
        started_at=None,
        stable_baseline=FeedbackCounts(),
        canary_baseline=FeedbackCounts(),
        message=message,
        **changes,  # type: ignore[arg-type]
    )


def note_held(state: RolloutState, observation: Observation) -> tuple[RolloutState, tuple[RolloutEvent, ...]]:
    """Records newly held versions above the stable one, one Warning each; forgets those no longer published."""
    fresh = sorted(v for v in observation.held if v > state.stable and v not in state.held)
    events = tuple(
        RolloutEvent(
            "Warning", "VersionHeld", f"version {v} held by the evaluation gate: {observation.held[v]}"
        )
        for v in fresh
    )
    held = tuple(sorted(v for v in {*state.held, *fresh} if v in observation.published))
    return (dataclasses.replace(state, held=held) if held != state.held else state), events


def step(state: RolloutState, policy: RolloutPolicy, observation: Observation) -> StepResult:
    """One decision: at most one transition per call, so every transition is recorded as it happens."""
    state, held_events = note_held(state, observation)
    result = _decide(state, policy, observation)
    if not held_events:
        return result
    return StepResult(result.state, (*held_events, *result.events), result.rollback_trainer_to)


def _decide(state: RolloutState, policy: RolloutPolicy, observation: Observation) -> StepResult:
    if state.phase is not Phase.IDLE:
        return _step_canary(state, policy, observation)
    candidate = next_candidate(state, observation.published, observation.held)
    if candidate is None:
        return StepResult(_idle(state, f"every replica serves version {state.stable}"))
    if policy.strategy is RolloutStrategy.IMMEDIATE:
        new = _idle(state, f"every replica serves version {candidate}", stable=candidate)
        event = RolloutEvent(
            "Normal", "VersionRolledOut", f"every replica now serves version {candidate} (was {state.stable})"
        )
        return StepResult(new, (event,))
    canaries = choose_canaries(observation.live_replicas, policy.canary_replicas)
    if canaries is None:
        waiting = (
            f"version {candidate} waits for {policy.canary_replicas + 1} live replicas to start a canary "
            f"({len(observation.live_replicas)} live)"
        )
        return StepResult(dataclasses.replace(state, message=waiting))
    new = RolloutState(
        stable=state.stable,
        phase=Phase.CANARY,
        candidate=candidate,
        canary_replicas=canaries,
        started_at=observation.now,
        stable_baseline=observation.counts_for(state.stable),
        canary_baseline=observation.counts_for(candidate),
        rejected=state.rejected,
        message=f"canary of version {candidate} on {', '.join(canaries)}",
        held=state.held,
    )
    event = RolloutEvent(
        "Normal",
        "CanaryStarted",
        f"version {candidate} serves on {', '.join(canaries)}; the other replicas stay on version {state.stable}",
    )
    return StepResult(new, (event,))


def _step_canary(state: RolloutState, policy: RolloutPolicy, observation: Observation) -> StepResult:
    assert state.candidate is not None
    candidate = state.candidate
    if candidate not in observation.published:
        message = f"version {candidate} is no longer published; back to version {state.stable} everywhere"
        return StepResult(_idle(state, message), (RolloutEvent("Warning", "CanaryAborted", message),))
    if policy.strategy is RolloutStrategy.IMMEDIATE:
        # A person switched strategies mid-canary: stop judging and roll out the newest version right away.
        aborted = _idle(state, "strategy changed to Immediate")
        abort = RolloutEvent(
            "Normal", "CanaryAborted", f"strategy changed to Immediate during the canary of {candidate}"
        )
        follow = step(aborted, policy, observation)
        return StepResult(follow.state, (abort, *follow.events), follow.rollback_trainer_to)
    reading = read_gates(state, policy.gates, observation)
    if reading.verdict is Verdict.WAIT:
        # Also where a held canary lands after a person relaxed its gates: it is judged again.
        return StepResult(
            dataclasses.replace(state, phase=Phase.CANARY, message=f"evaluating: {reading.summary}")
        )
    if reading.verdict is Verdict.PROMOTE:
        message = f"version {candidate} promoted to every replica: {reading.summary}"
        new = _idle(state, message, stable=candidate)
        return StepResult(new, (RolloutEvent("Normal", "CanaryPromoted", message),))
    why = (
        "acceptance dropped too far"
        if reading.verdict is Verdict.FAIL
        else f"not enough feedback within {policy.gates.timeout_seconds:g}s"
    )
    if policy.gates.auto_rollback:
        message = f"version {candidate} rolled back ({why}): {reading.summary}"
        new = _idle(state, message, rejected=(*state.rejected, candidate))
        return StepResult(new, (RolloutEvent("Warning", "CanaryRolledBack", message),), state.stable)
    message = f"version {candidate} held ({why}; automatic rollback is off): {reading.summary}"
    if state.phase is Phase.HELD:
        return StepResult(dataclasses.replace(state, message=message))
    held = dataclasses.replace(state, phase=Phase.HELD, message=message)
    return StepResult(held, (RolloutEvent("Warning", "CanaryHeld", message),))


def replicas_behind(state: RolloutState, loaded: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """Live replicas that have not loaded what the pointer asks of them: name -> (loaded, wanted)."""
    return {
        name: (version, state.version_for(name))
        for name, version in sorted(loaded.items())
        if version != state.version_for(name)
    }
