"""What data-parallel rounds become: one version every `publish_every_steps` rounds, written once by the leader.

Each member sends its `Contribution` to every round (the feedback it trained, how each sample went, its loss
and tokens, the digest of its weights after the step); every member keeps the round's contributions as an
`AppliedRound` until a version covers it. On the N-th round the leader turns the rounds since the last version
into one `VersionDraft` and commits it under its fencing token (versions/publisher.py). The finalize step of
that commit acknowledges every member's entries of those rounds (XACK works on any consumer's pending entry),
so acknowledgement still follows the commit, and rounds that are not committed acknowledge nothing. Pure: no
torch, no Redis.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alchemist_protocol.schemas import ArtifactKind, EvaluationReading

from alchemist_worker.continual.rehearsal import RehearsalEntry
from alchemist_worker.feedback.consumer import SettledFeedback
from alchemist_worker.versions.publisher import VersionDraft, entry_ranges


@dataclass(frozen=True)
class Contribution:
    replica: str
    feedback: list[SettledFeedback]
    outcomes: list[tuple[str, str]]  # (path, reason) per sample: "reused" / "recomputed" and why
    tokens: int  # prompt + response tokens
    response_tokens: int
    units: int  # what its mean loss divides by (response tokens, or samples for KTO and DPO)
    loss_sum: float  # mean loss x units
    digest: str  # of the weights after the step; "" when not verified
    error: str = ""  # why its local step failed (it then contributed nothing)
    answers: list[RehearsalEntry] = field(default_factory=list)  # its desirable answers, for the rehearsal
    rehearsed: int = 0  # earlier answers it rehearsed in the round (the leader draws them)


@dataclass(frozen=True)
class AppliedRound:
    """A round every member stepped on, not yet in a version (the same on every member: all gathered it)."""

    step: int  # the optimizer step it applied (optimizer steps so far)
    contributions: list[Contribution]
    lr: float = 0.0  # the learning rate of that step


@dataclass(frozen=True)
class RoundOutcome:
    """What the leader tells every member after each round."""

    version: int | None = None  # the version this round completed; None: kept for a later version
    error: str = ""  # why the round failed: the members regroup and restore the newest committed version
    held: bool = False  # the evaluation gate held the version
    revert_to: int | None = None  # held, and training goes on from this version (its parent): all restore it


@dataclass
class RoundStats:
    """Where a member's round time went, for the benchmark and /v1/versions."""

    rounds: int = 0
    empty_polls: int = 0
    round_s: float = 0.0  # from the agreement to the outcome
    local_s: float = 0.0  # waiting for the local gradient (engine slices)
    comm_s: float = 0.0  # in collectives after the local gradient (all-reduce, gather, outcome)
    commit_s: float = 0.0  # the leader's commit, its scoring of the candidate included
    regroups: int = 0
    failures: int = 0
    last_error: str = ""
    history: list[dict[str, float]] = field(default_factory=list)

    def snapshot(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "round_s": round(self.round_s, 4),
            "local_s": round(self.local_s, 4),
            "comm_s": round(self.comm_s, 4),
            "commit_s": round(self.commit_s, 4),
            "regroups": self.regroups,
            "failures": self.failures,
            "last_error": self.last_error,
        }


def diverged(contributions: Sequence[Contribution]) -> str:
    """Why members' weights differ after the step, or "" when their digests agree (or are not computed)."""
    digests = {c.replica: c.digest for c in contributions if c.digest}
    if len(set(digests.values())) <= 1:
        return ""
    return f"members' weights differ after the step: {digests}"


def round_draft(
    rounds: Sequence[AppliedRound],
    *,
    version: int,
    parent: int,
    kind: ArtifactKind,
    write_files: Callable[[Path], None],
    training: dict[str, Any],
    generation: int,
    expected_head: int,
    evaluation: EvaluationReading | None = None,
) -> VersionDraft:
    """The version of the rounds since the last one (oldest first; their feedback listed in that order).
    `parent`: what the members trained from (the head, or a rollback's target); `expected_head`: the newest
    published version, which the commit checks is still the newest; `evaluation`: the gate's reading of the
    candidate, when the job names an evaluation set."""
    if not rounds:
        raise ValueError("a version needs at least one round")
    contributions = [c for r in rounds for c in r.contributions]
    settled = [fb for c in contributions for fb in c.feedback]
    units = sum(c.units for c in contributions)
    outcomes = [o for c in contributions for o in c.outcomes]
    members = [c.replica for c in rounds[-1].contributions]
    samples = Counter({name: 0 for name in members})
    for c in contributions:
        samples[c.replica] += len(c.feedback)
    return VersionDraft(
        version=version,
        parent=parent,
        kind=kind,
        write_files=write_files,
        feedback=settled,
        loss=sum(c.loss_sum for c in contributions) / max(1, units),
        samples=len(settled),
        training={
            **training,
            "steps": [r.step for r in rounds],
            "learning_rates": [r.lr for r in rounds],
            "reused": sum(path == "reused" for path, _ in outcomes),
            "recomputed": sum(path == "recomputed" for path, _ in outcomes),
            "rehearsed": sum(c.rehearsed for c in contributions),
            "recomputed_because": dict(Counter(reason for path, reason in outcomes if path == "recomputed")),
            "data_parallel": {
                "generation": generation,
                "members": members,
                "samples": dict(samples),
                "round_samples": [sum(len(c.feedback) for c in r.contributions) for r in rounds],
                "digests": {c.replica: c.digest for c in rounds[-1].contributions},
            },
        },
        feedback_ranges=entry_ranges([e for s in settled for e in s.entry_ids]),
        expected_head=expected_head,
        evaluation=evaluation,
    )
