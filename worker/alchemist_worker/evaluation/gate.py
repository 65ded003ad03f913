"""The evaluation gate's decision: may a candidate version be rolled out, given its scores and its elders'?

Pure. A candidate is compared with its parent (the version it was trained from) and with the base model
(version 0), on every score both sides have: perplexity on plain text and the reference answers' per-token
NLL may rise by at most a relative bound, the exact-match share may fall by at most an absolute one. The
parent catches one bad batch (a run of wrong corrections); the base catches a slow drift that no single
version's bound would. A parent scored on another evaluation set (or before the job had one) is skipped and
the reading says so; the base is always scored on the current set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from alchemist_protocol.schemas import EvaluationReading, EvaluationScores, GateDecision, VersionInfo


@dataclass(frozen=True)
class GateBounds:
    max_perplexity_increase: float = 0.02  # relative: 0.02 allows 2% above the parent's and the base's
    max_reference_nll_increase: float = 0.05  # relative, the reference answers' mean NLL per token
    max_exact_match_drop: float = 0.05  # absolute share of reference items

    def __post_init__(self) -> None:
        for name in ("max_perplexity_increase", "max_reference_nll_increase", "max_exact_match_drop"):
            if not 0 <= getattr(self, name) <= 10:
                raise ValueError(f"{name} must be between 0 and 10, got {getattr(self, name)}")


def regressions(
    candidate: EvaluationScores, reference: EvaluationScores, name: str, bounds: GateBounds
) -> list[str]:
    """One line per bound the candidate breaks against `reference` (called `name` in the lines)."""
    out = []
    rising = (
        ("perplexity", candidate.perplexity, reference.perplexity, bounds.max_perplexity_increase),
        (
            "reference NLL",
            candidate.reference_nll,
            reference.reference_nll,
            bounds.max_reference_nll_increase,
        ),
    )
    for what, mine, theirs, bound in rising:
        if mine is None or theirs is None:
            continue
        if mine > theirs * (1 + bound) + 1e-12:
            change = (mine / theirs - 1) if theirs > 0 else float("inf")
            out.append(f"{what} {mine:.4g} is {change:.1%} above {name}'s {theirs:.4g} (bound {bound:.1%})")
    mine_em, theirs_em = candidate.exact_match, reference.exact_match
    if (
        mine_em is not None
        and theirs_em is not None
        and mine_em < theirs_em - bounds.max_exact_match_drop - 1e-12
    ):
        out.append(
            f"exact match {mine_em:.1%} is {theirs_em - mine_em:.1%} below {name}'s {theirs_em:.1%} "
            f"(bound {bounds.max_exact_match_drop:.1%})"
        )
    return out


def parent_scores(
    parent: int, parent_info: VersionInfo | None, base: EvaluationScores, digest: str
) -> EvaluationScores | None:
    """The parent's scores on this set: the base's for version 0, else its own reading if made on this set."""
    if parent == 0:
        return base
    reading = None if parent_info is None else parent_info.evaluation
    if reading is None or reading.set_digest != digest:
        return None
    return reading.scores


def judge(
    candidate: EvaluationScores,
    *,
    base: EvaluationScores,
    parent: int,
    parent_scores: EvaluationScores | None,
    digest: str,
    bounds: GateBounds,
) -> EvaluationReading:
    reasons = []
    if parent != 0 and parent_scores is not None:
        reasons += regressions(candidate, parent_scores, f"parent v{parent}", bounds)
    reasons += regressions(candidate, base, "base v0", bounds)
    return EvaluationReading(
        set_digest=digest,
        scores=candidate,
        base=base,
        parent=parent,
        parent_scores=parent_scores,
        decision=GateDecision.HELD if reasons else GateDecision.PASSED,
        reasons=reasons,
    )


def is_held(info: VersionInfo | None) -> bool:
    return info is not None and info.evaluation is not None and info.evaluation.held


def newest_passed(version: int, info_of: Callable[[int], VersionInfo | None]) -> int:
    """`version`, or its newest ancestor the gate did not hold (0, the base, at the latest): where training
    continues when held versions are reverted."""
    seen = set()
    while version != 0 and version not in seen:
        seen.add(version)
        info = info_of(version)
        if not is_held(info):
            return version
        assert info is not None
        version = info.parent
    return version


def consecutive_holds(
    head: int, latest: int, info_of: Callable[[int], VersionInfo | None], window: int = 64
) -> int:
    """How many candidates trained from `head` the gate held since the last one it passed (or since `head`
    was published): the newest versions first, stopping at a passed child of `head`. Versions trained from
    elsewhere (a branch a rollback abandoned, another parent) are not counted. Only the newest `window`
    versions are read (a rollback far back would otherwise read the whole history; 0.5 ** 64 is no step)."""
    holds = 0
    for version in range(latest, max(head, latest - window), -1):
        info = info_of(version)
        if info is None or info.parent != head:
            continue
        if not is_held(info):
            break
        holds += 1
    return holds
