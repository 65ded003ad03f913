"""The evaluation gate as the trainer runs it: the encoded set, the base model's scores, and the judgement.

The trainer scores a candidate at the end of the step that completes a version, inside that step's cursor
(so in slices, with the training weights installed), and the base model's scores once, on first use, in the
same cursor with the base weights installed. The control thread then judges the candidate against its parent's
reading (from the parent's published metadata) and the base, and the reading is published with the version.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from alchemist_protocol.schemas import EvaluationReading, EvaluationScores, VersionInfo

from alchemist_worker.evaluation.eval_set import EncodedItem, encode_eval_set, load_eval_set
from alchemist_worker.evaluation.gate import GateBounds, judge, parent_scores
from alchemist_worker.evaluation.gate_metrics import GateMetrics
from alchemist_worker.evaluation.scoring import score_items
from alchemist_worker.evaluation.settings import EvaluationSettings, OnHeld


class CandidateEvaluation:
    def __init__(
        self,
        items: list[EncodedItem],
        digest: str,
        bounds: GateBounds,
        metrics: GateMetrics | None = None,
        on_held: OnHeld = OnHeld.REVERT,
        held_backoff: float = 0.5,
    ) -> None:
        if not items:
            raise ValueError("an evaluation needs at least one item")
        self.items = items
        self.digest = digest
        self.bounds = bounds
        self.metrics = metrics
        self.on_held = on_held
        self.held_backoff = held_backoff
        self.base: EvaluationScores | None = None  # version 0's scores, once computed

    @classmethod
    def load(
        cls,
        settings: EvaluationSettings,
        encode_text: Callable[[str], list[int]],
        encode_chat: Callable[[list[dict[str, str]]], list[int]],
        max_model_len: int,
        metrics: GateMetrics | None = None,
    ) -> CandidateEvaluation | None:
        """None without an evaluation set; raises InvalidEvaluationSet when the set cannot be used."""
        if settings.path is None:
            return None
        eval_set = load_eval_set(settings.path)
        items = encode_eval_set(eval_set, encode_text, encode_chat, min(settings.max_tokens, max_model_len))
        return cls(items, eval_set.digest, settings.bounds, metrics, settings.on_held, settings.held_backoff)

    def lr_scale(self, holds: int) -> float:
        """The learning-rate multiplier after `holds` held candidates in a row from the same version (1 when
        held versions are not reverted: training then moves on from them anyway)."""
        if self.on_held is not OnHeld.REVERT:
            return 1.0
        return self.held_backoff**holds

    def score(self, model: Any, device: torch.device) -> EvaluationScores:
        return score_items(model, device, self.items)

    def reading(
        self, candidate: EvaluationScores, parent: int, parent_info: VersionInfo | None
    ) -> EvaluationReading:
        """The gate's reading of a candidate trained from `parent` (whose metadata is `parent_info`)."""
        if self.base is None:
            raise RuntimeError("the base model has not been scored yet")
        return judge(
            candidate,
            base=self.base,
            parent=parent,
            parent_scores=parent_scores(parent, parent_info, self.base, self.digest),
            digest=self.digest,
            bounds=self.bounds,
        )

    def judged(self, version: int, reading: EvaluationReading) -> None:
        if self.metrics is not None:
            self.metrics.judged(version, reading)
