"""The version of several data-parallel rounds (pure: no processes, no torch)."""

from __future__ import annotations

import pytest
from alchemist_protocol.schemas import ArtifactKind
from alchemist_worker.distributed.round_commit import AppliedRound, Contribution, diverged, round_draft
from alchemist_worker.feedback.consumer import SettledFeedback
from alchemist_worker.versions.publisher import VersionDraft


def contribution(replica: str, ids: list[int], units: int, loss: float, digest: str = "d") -> Contribution:
    return Contribution(
        replica=replica,
        feedback=[SettledFeedback(f"fb-{n}", [f"{n}-0"], "accept", 0) for n in ids],
        outcomes=[("recomputed", "other_replica")] * len(ids),
        tokens=10 * len(ids),
        response_tokens=units,
        units=units,
        loss_sum=loss * units,
        digest=digest,
    )


def draft_of(rounds: list[AppliedRound]) -> VersionDraft:
    return round_draft(
        rounds,
        version=3,
        parent=2,
        kind=ArtifactKind.LORA,
        write_files=lambda path: None,
        training={"optimizer": "sgd"},
        generation=4,
        expected_head=2,
    )


def test_a_version_of_two_rounds_lists_both_in_order() -> None:
    first = AppliedRound(7, [contribution("r0", [1, 2], 6, 1.0), contribution("r1", [3], 2, 3.0)])
    second = AppliedRound(8, [contribution("r0", [], 0, 0.0), contribution("r1", [4, 5], 4, 0.5, "e")])
    draft = draft_of([first, second])
    assert [fb.feedback_id for fb in draft.feedback] == ["fb-1", "fb-2", "fb-3", "fb-4", "fb-5"]
    assert draft.samples == 5
    assert draft.loss == pytest.approx((6 * 1.0 + 2 * 3.0 + 4 * 0.5) / 12)
    assert draft.training["steps"] == [7, 8]
    dp = draft.training["data_parallel"]
    assert dp["samples"] == {"r0": 2, "r1": 3}
    assert dp["round_samples"] == [3, 2]
    assert dp["digests"] == {"r0": "d", "r1": "e"}  # after the version's last step
    assert draft.feedback_ranges == [("1-0", "5-0")]


def test_no_round_no_version() -> None:
    with pytest.raises(ValueError, match="at least one round"):
        draft_of([])


def test_digests_that_differ_are_named() -> None:
    assert diverged([contribution("r0", [], 0, 0.0, "a"), contribution("r1", [], 0, 0.0, "a")]) == ""
    assert "r1" in diverged([contribution("r0", [], 0, 0.0, "a"), contribution("r1", [], 0, 0.0, "b")])
