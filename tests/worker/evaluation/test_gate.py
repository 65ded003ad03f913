"""The gate decision as pure code: bounds against the parent and the base, skipped parents, messages."""

from __future__ import annotations

import pytest
from alchemist_protocol.schemas import (
    ArtifactKind,
    EvaluationReading,
    EvaluationScores,
    GateDecision,
    VersionInfo,
)
from alchemist_worker.evaluation.gate import GateBounds, consecutive_holds, judge, parent_scores

BOUNDS = GateBounds(max_perplexity_increase=0.02, max_reference_nll_increase=0.05, max_exact_match_drop=0.1)
BASE = EvaluationScores(
    perplexity=10.0, reference_nll=2.0, exact_match=0.5, text_tokens=100, reference_items=10
)


def scores(ppl: float | None = 10.0, nll: float | None = 2.0, em: float | None = 0.5) -> EvaluationScores:
    return EvaluationScores(perplexity=ppl, reference_nll=nll, exact_match=em)


def test_within_every_bound_passes() -> None:
    reading = judge(
        scores(10.19, 2.09, 0.41), base=BASE, parent=0, parent_scores=BASE, digest="d", bounds=BOUNDS
    )
    assert reading.decision is GateDecision.PASSED
    assert reading.reasons == []


@pytest.mark.parametrize(
    ("candidate", "needle"),
    [
        (scores(ppl=10.25), "perplexity 10.25 is 2.5% above base v0's 10 (bound 2.0%)"),
        (scores(nll=2.2), "reference NLL 2.2 is 10.0% above base v0's 2 (bound 5.0%)"),
        (scores(em=0.3), "exact match 30.0% is 20.0% below base v0's 50.0% (bound 10.0%)"),
    ],
)
def test_each_bound_holds_against_the_base(candidate: EvaluationScores, needle: str) -> None:
    reading = judge(candidate, base=BASE, parent=0, parent_scores=BASE, digest="d", bounds=BOUNDS)
    assert reading.decision is GateDecision.HELD
    assert reading.reasons == [needle]


def test_a_jump_from_the_parent_holds_even_when_the_base_is_still_close() -> None:
    parent = scores(ppl=9.0)  # the lineage improved; the candidate fell back by 11% in one version
    reading = judge(scores(ppl=10.0), base=BASE, parent=3, parent_scores=parent, digest="d", bounds=BOUNDS)
    assert reading.held
    assert reading.reasons == ["perplexity 10 is 11.1% above parent v3's 9 (bound 2.0%)"]


def test_a_slow_drift_is_caught_by_the_base_when_each_step_is_small() -> None:
    parent = scores(ppl=10.3)
    reading = judge(scores(ppl=10.4), base=BASE, parent=7, parent_scores=parent, digest="d", bounds=BOUNDS)
    assert reading.held
    assert [r.split(" is ")[1].split("'s")[0] for r in reading.reasons] == ["4.0% above base v0"]


def test_scores_missing_on_either_side_are_not_compared() -> None:
    text_only = scores(nll=None, em=None)
    reading = judge(text_only, base=BASE, parent=0, parent_scores=BASE, digest="d", bounds=BOUNDS)
    assert reading.decision is GateDecision.PASSED


def test_parent_scores_come_from_its_reading_on_the_same_set_only() -> None:
    def info(digest: str | None) -> VersionInfo:
        reading = None
        if digest is not None:
            reading = EvaluationReading(
                set_digest=digest, scores=scores(ppl=9.5), base=BASE, parent=0, decision=GateDecision.PASSED
            )
        return VersionInfo(version=2, parent=1, kind=ArtifactKind.LORA, path="", evaluation=reading)

    assert parent_scores(0, None, BASE, "d") == BASE
    assert parent_scores(2, info("d"), BASE, "d") == scores(ppl=9.5)
    assert parent_scores(2, info("other"), BASE, "d") is None
    assert parent_scores(2, info(None), BASE, "d") is None
    assert parent_scores(2, None, BASE, "d") is None  # pruned
    # Without the parent's scores the base alone judges, and the reading says which was used.
    reading = judge(scores(ppl=10.1), base=BASE, parent=2, parent_scores=None, digest="d", bounds=BOUNDS)
    assert reading.decision is GateDecision.PASSED and reading.parent_scores is None


def test_a_reading_round_trips_through_version_metadata() -> None:
    reading = judge(scores(ppl=11.0), base=BASE, parent=0, parent_scores=BASE, digest="d", bounds=BOUNDS)
    info = VersionInfo(version=1, parent=0, kind=ArtifactKind.LORA, path="", evaluation=reading)
    again = VersionInfo.model_validate_json(info.model_dump_json())
    assert again.held and again.evaluation == reading
    assert not VersionInfo(version=1, parent=0, kind=ArtifactKind.LORA, path="").held


@pytest.mark.parametrize("name", ["max_perplexity_increase", "max_exact_match_drop"])
def test_negative_bounds_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        GateBounds(**{name: -0.1})


def test_consecutive_holds_count_the_head_s_children_back_to_the_last_one_passed() -> None:
    def version(number: int, parent: int, held: bool) -> VersionInfo:
        ppl = 11.0 if held else 10.0  # 10% above the base holds
        reading = judge(
            scores(ppl=ppl), base=BASE, parent=parent, parent_scores=None, digest="d", bounds=BOUNDS
        )
        return VersionInfo(version=number, parent=parent, kind=ArtifactKind.LORA, path="", evaluation=reading)

    # v1 passed; v2, v3 held (from v1); v4 passed (from v1); v5 held (from v4); v6 held (from v1: a rollback
    # to v1 abandoned v4); v7 held (from v4, before the rollback was honoured).
    lineage = [
        version(1, 0, False),
        version(2, 1, True),
        version(3, 1, True),
        version(4, 1, False),
        version(5, 4, True),
        version(6, 1, True),
        version(7, 4, True),
    ]
    infos = {v.version: v for v in lineage}
    assert consecutive_holds(1, 3, infos.get) == 2
    assert consecutive_holds(1, 7, infos.get) == 1  # v6 only: v4 passed before it
    assert consecutive_holds(4, 7, infos.get) == 2
    assert consecutive_holds(7, 7, infos.get) == 0
    assert consecutive_holds(0, 7, infos.get) == 0  # v1 passed
    assert consecutive_holds(1, 3, infos.get, window=1) == 1  # v3 only
    del infos[6]  # metadata pruned: skipped
    assert consecutive_holds(1, 7, infos.get) == 0
