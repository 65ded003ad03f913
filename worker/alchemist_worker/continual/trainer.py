"""The trainer proper: optimizer, schedule and the step in progress, on the serving model, sliced.

Everything here runs on the engine loop's thread (or on the step cursor's thread while that one waits), so the
model, the activation store and the weights are never touched by two threads at once. A step:
1. hedges each sample against the activation store: a record is offered to the reuse path only if this replica
   recorded it, under a version on the trainer's own lineage (after a rollback, records of the abandoned
   branch are recomputed); the training package then decides the rest (missing, evicted, stale, policy...);
2. accumulates gradients micro-batch by micro-batch (`micro_batch_tokens`), weighting each by its tokens so
   the step's gradient is that of the mean loss over all its response tokens;
3. clips, steps the optimizer and the learning-rate schedule.
It runs inside a `StepCursor`, so the runtime advances it in slices between engine iterations, with the
training weights installed only during its slices.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from alchemist_protocol.schemas import EvaluationScores

from alchemist_worker.activations.store import ActivationStore
from alchemist_worker.continual.rehearsal import RehearsalBuffer, RehearsalEntry, answers_of
from alchemist_worker.continual.settings import Mode, Optimizer, Schedule, TrainerSettings
from alchemist_worker.continual.step_cursor import StepCursor, cursor_yield
from alchemist_worker.continual.trainable_weights import TrainableWeights, WeightSet
from alchemist_worker.evaluation.candidate import CandidateEvaluation
from alchemist_worker.feedback.samples import TrainingSample as FeedbackSample
from alchemist_worker.model.transformer import Transformer
from alchemist_worker.training import Decision, StepConfig, StepReport, TrainingSample, accumulate_gradients
from alchemist_worker.training.objectives import Label, needs_reference
from alchemist_worker.training.reference import with_reference
from alchemist_worker.training.step import step_units

LOGIT_ROWS = 8  # rows of the vocabulary projection per operator inside a training step
REHEARSAL_PREFIX = "rehearsal:"  # sample ids of rehearsed answers within a step


@dataclass(frozen=True)
class SampleResult:
    feedback_id: str
    path: str  # "reused" or "recomputed"
    reason: str  # why it was recomputed; "" when reused
    staleness: int | None  # versions between the record and the trained weights, when reused


@dataclass
class StepResult:
    samples: list[FeedbackSample]
    loss: float
    tokens: int  # prompt + response tokens
    response_tokens: int
    results: list[SampleResult]
    busy_s: float
    wall_s: float
    slices: int
    step: int  # optimizer steps so far, this one included
    lr: float
    extra: dict[str, Any] = field(default_factory=dict)


def lr_factor(settings: TrainerSettings, step: int) -> float:
    """Multiplier of the base learning rate before optimizer step `step` (0-based)."""
    if settings.warmup_steps and step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    if settings.schedule is Schedule.CONSTANT:
        return 1.0
    span = max(1, settings.total_steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    if settings.schedule is Schedule.LINEAR:
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def micro_batches(samples: list[FeedbackSample], max_tokens: int) -> list[list[FeedbackSample]]:
    """Consecutive groups of at most `max_tokens` tokens (a longer sample is a group of its own)."""
    groups: list[list[FeedbackSample]] = []
    tokens = 0
    for sample in samples:
        if groups and tokens + sample.num_tokens <= max_tokens:
            groups[-1].append(sample)
            tokens += sample.num_tokens
        else:
            groups.append([sample])
            tokens = sample.num_tokens
    return groups


class ContinualTrainer:
    def __init__(
        self,
        model: Transformer,
        weights: TrainableWeights,
        store: ActivationStore,
        settings: TrainerSettings,
        replica: str,
    ) -> None:
        if settings.mode is Mode.TRUNCATED:
            raise ValueError(
                "training mode 'truncated' is not available: the training package implements the exact path "
                "only; set ALCHEMIST_TRAINING_MODE=exact (the truncated mode is never substituted silently)"
            )
        self.model = model
        self.weights = weights
        self.store = store
        self.settings = settings
        self.replica = replica
        params = weights.parameters()
        if settings.optimizer is Optimizer.ADAMW:
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                params, lr=settings.learning_rate, weight_decay=settings.weight_decay
            )
        else:
            self.optimizer = torch.optim.SGD(
                params, lr=settings.learning_rate, weight_decay=settings.weight_decay
            )
        self.step_count = 0
        self.head_version = 0  # the committed version the training weights descend from
        self.lineage: set[int] = {0}  # the head and its ancestors
        self.device = next(model.parameters()).device
        self._cursor: StepCursor[StepResult] | None = None
        self._started = 0.0
        self.evaluation: CandidateEvaluation | None = None  # the gate's set, when the job names one
        # The learning rate's multiplier from the gate's holds of candidates trained from the head (restore()).
        self.lr_scale = 1.0
        self.rehearsal = RehearsalBuffer(settings.rehearsal_capacity)
        # Desirable answers trained since the newest committed version: they enter the rehearsal buffer once
        # that version is committed and passed (continual/rehearsal.py).
        self.unadmitted: list[RehearsalEntry] = []
        # Records reused by steps since the newest committed version: dropped from the store once a version
        # covers those steps, not before, so that samples of steps that never commit reuse them again.
        self.used_records: set[str] = set()
        self._slice_weights: WeightSet | None = None  # installed instead of the training set (base scoring)

    def apply_settings(self, settings: TrainerSettings) -> None:
        """New hyper-parameters (the operator's live settings), used from the next optimizer step on."""
        if settings.optimizer is not self.settings.optimizer or settings.method is not self.settings.method:
            raise ValueError("the optimizer and the training method cannot change without a restart")
        self.settings = settings

    # The step in progress.
    @property
    def busy(self) -> bool:
        return self._cursor is not None

    def begin(self, samples: list[FeedbackSample], evaluate: bool = False) -> None:
        """`evaluate`: the step completes a version, so the candidate is scored on the evaluation set (in the
        same cursor, after the optimizer step) and its scores go into the result's `extra["evaluation"]`."""
        if not self._can_step(samples):
            raise ValueError("a training step needs at least one sample")
        self._start(lambda: self._step_and_evaluate(samples, evaluate))

    def _can_step(self, samples: list[FeedbackSample]) -> bool:
        return bool(samples)

    def begin_evaluation(self) -> None:
        """Scores the training weights as they stand on the evaluation set, in slices, without a step: a
        data-parallel leader's candidate is the round's applied step, scored before it is committed. The result
        carries only `extra["evaluation"]`."""
        if self.evaluation is None:
            raise RuntimeError("the job names no evaluation set")
        self._start(self._evaluation_only)

    def _start(self, step: Callable[[], StepResult]) -> None:
        if self._cursor is not None:
            raise RuntimeError("a training step is already in progress")
        self._started = time.monotonic()
        self._cursor = StepCursor(
            step,
            yield_at_modules=list(self.model.layers),
            on_resume=self._resume,
            on_pause=self._pause,
            device=self.device,
        )

    def _resume(self) -> None:
        if self._slice_weights is not None:
            self.weights.install(self._slice_weights)
        else:
            self.weights.use_training()
        # The output projection over the vocabulary is a step's largest single operator; computed in row chunks
        # with a yield point between them (in forward and, through autograd, in backward), it no longer sets
        # the floor of a slice. Same numbers: rows are independent. Serving keeps the model's own method.
        self.model.compute_logits = self._chunked_logits  # type: ignore[method-assign]

    def _pause(self) -> None:
        self.model.__dict__.pop("compute_logits", None)
        self.weights.use_serving()

    def _chunked_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab], LOGIT_ROWS rows at a time."""
        head = self.model.lm_head
        if hidden.shape[0] <= LOGIT_ROWS:
            return head(hidden)
        parts = []
        for chunk in hidden.split(LOGIT_ROWS):
            parts.append(head(chunk))
            cursor_yield()
        return torch.cat(parts)

    def advance(self, budget_s: float) -> StepResult | None:
        """Runs the step for about `budget_s`; its result once it is done. Raises what the step raised."""
        cursor = self._cursor
        if cursor is None or not cursor.advance(budget_s):
            return None
        self._cursor = None
        result = cursor.result()
        result.busy_s, result.slices = cursor.busy_s, cursor.slices
        result.wall_s = time.monotonic() - self._started
        return result

    def cancel(self) -> None:
        """Abandons the step in progress (its samples stay unacknowledged and train again later)."""
        if self._cursor is not None:
            self._cursor.cancel()
            self._cursor = None
            for param in self.weights.parameters():
                param.grad = None

    # Step thread.
    def _step_and_evaluate(self, samples: list[FeedbackSample], evaluate: bool) -> StepResult:
        result = self._step(samples)
        if evaluate and self.evaluation is not None:
            result.extra["evaluation"] = self._score_candidate(self.evaluation)
        return result

    def _evaluation_only(self) -> StepResult:
        assert self.evaluation is not None
        result = StepResult(
            samples=[],
            loss=0.0,
            tokens=0,
            response_tokens=0,
            results=[],
            busy_s=0.0,
            wall_s=0.0,
            slices=0,
            step=self.step_count,
            lr=0.0,
        )
        result.extra["evaluation"] = self._score_candidate(self.evaluation)
        return result

    def _score_candidate(self, evaluation: CandidateEvaluation) -> EvaluationScores:
        """The training weights' scores; the base model's first, once per process, with its weights installed
        for those slices."""
        if evaluation.base is None:
            self._slice_weights = self.weights.base_serving_set()
            self.weights.install(self._slice_weights)
            try:
                evaluation.base = evaluation.score(self.model, self.device)
            finally:
                self._slice_weights = None
                self.weights.use_training()
        return evaluation.score(self.model, self.device)

    def _step(self, samples: list[FeedbackSample]) -> StepResult:
        rehearsed = self._rehearsed()
        reports, own_reasons, total = self._accumulate(samples + rehearsed)
        lr = self._optimizer_step()
        self.unadmitted += answers_of(samples)
        result = self._result(samples, reports, own_reasons, total, lr)
        result.extra["rehearsed"] = len(rehearsed)
        return result

    def _rehearsed(self) -> list[FeedbackSample]:
        """This step's draw from the rehearsal buffer as samples: recomputed (no replica holds their record),
        desirable."""
        entries = self.rehearsal.draw(self.settings.rehearsal_samples, self.step_count)
        return [
            FeedbackSample(
                feedback_id=f"{REHEARSAL_PREFIX}{i}:{entry.feedback_id}",
                request_id="",
                prompt_tokens=entry.prompt_tokens,
                response_tokens=entry.response_tokens,
                served_version=-1,
                served_by="",
                corrected=False,
            )
            for i, entry in enumerate(entries)
        ]

    def _accumulate(self, samples: list[FeedbackSample]) -> tuple[list[StepReport], dict[str, str], int]:
        """Leaves in `.grad` the gradient of the objective's mean loss over the samples.

        Returns the micro-batches' reports, why samples were recomputed (this replica's own reasons) and what
        the mean divides by (response tokens for token-level objectives, samples for KTO and DPO:
        objectives.loss_units). A data-parallel round (distributed/) all-reduces this gradient weighted by
        those units before `_optimizer_step`.
        """
        params = self.weights.parameters()
        for param in params:
            param.grad = None
        own_reasons: dict[str, str] = {}
        config = StepConfig(
            max_staleness=self.settings.max_staleness,
            objective=self.settings.objective,
            objective_config=self.settings.objective_config(),
            consume_records=False,  # at the commit (`committed`)
        )
        groups = [
            self._hedge(group, own_reasons)
            for group in micro_batches(samples, self.settings.micro_batch_tokens)
        ]
        units = [step_units(group, config.objective) for group in groups]
        total = sum(units)
        reports: list[StepReport] = []
        previous = 0
        for local, tokens in zip(groups, units, strict=True):
            if previous:  # keep .grad = (1 / units of this group) * sum of unit-weighted gradients so far
                self._scale_grads(params, previous / tokens)
            if needs_reference(config.objective, config.objective_config):
                local = self._with_reference(local, log_softmax=config.objective_config.kl_weight > 0)
            report = accumulate_gradients(
                self.model, self.store, local, version=self.head_version, config=config
            )
            reports.append(report)
            reused = {o.sample_id for o in report.outcomes if o.decision is Decision.REUSED}
            self.used_records.update(s.record_id for s in local if s.sample_id in reused and s.record_id)
            previous = tokens
            cursor_yield()
        self._scale_grads(params, previous / total)
        return reports, own_reasons, total

    def _optimizer_step(self) -> float:
        """Clips, steps the optimizer and the schedule; returns the learning rate it used."""
        params = self.weights.parameters()
        if self.settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm)
        lr = self.settings.learning_rate * lr_factor(self.settings, self.step_count) * self.lr_scale
        for group_ in self.optimizer.param_groups:
            group_["lr"] = lr
            group_["weight_decay"] = self.settings.weight_decay
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return lr

    def _result(
        self,
        samples: list[FeedbackSample],
        reports: list[StepReport],
        own_reasons: dict[str, str],
        total: int,
        lr: float,
    ) -> StepResult:
        outcomes = {o.sample_id: o for r in reports for o in r.outcomes}
        results = []
        for sample in samples:
            outcome = outcomes[sample.feedback_id]  # a replaced answer goes the way of its correction
            reused = outcome.decision is Decision.REUSED
            reason = "" if reused else own_reasons.get(sample.feedback_id) or (outcome.reason or "unknown")
            staleness = (
                self.head_version - outcome.record_version
                if reused and outcome.record_version is not None
                else None
            )
            results.append(
                SampleResult(sample.feedback_id, "reused" if reused else "recomputed", str(reason), staleness)
            )
        loss = sum(r.loss * r.loss_units for r in reports) / total
        return StepResult(
            samples=samples,
            loss=loss,
            tokens=sum(s.num_tokens for s in samples),
            response_tokens=total,
            results=results,
            busy_s=0.0,
            wall_s=0.0,
            slices=0,
            step=self.step_count,
            lr=lr,
        )

    def _with_reference(self, samples: list[TrainingSample], *, log_softmax: bool) -> list[TrainingSample]:
        """The samples' log-probabilities under the base model (training/reference.py), its weights installed
        for this forward's slices."""
        self._slice_weights = self.weights.base_serving_set()
        self.weights.install(self._slice_weights)
        try:
            return with_reference(self.model, samples, log_softmax=log_softmax)
        finally:
            self._slice_weights = None
            self.weights.use_training()

    def _hedge(self, samples: list[FeedbackSample], reasons: dict[str, str]) -> list[TrainingSample]:
        """Training-package samples; a record is offered only when it can belong to this lineage. A
        correction's replaced answer is a second, undesirable sample over the same prompt and record."""
        out: list[TrainingSample] = []
        for sample in samples:
            record_id: str | None = sample.request_id
            if sample.feedback_id.startswith(REHEARSAL_PREFIX):
                record_id, reasons[sample.feedback_id] = None, "rehearsal"
            elif sample.served_by != self.replica:
                record_id, reasons[sample.feedback_id] = None, "other_replica"
            elif sample.served_version not in self.lineage:
                record_id, reasons[sample.feedback_id] = None, "other_lineage"
            prompt = torch.tensor(sample.prompt_tokens, dtype=torch.long)
            pair = sample.feedback_id if sample.replaced_tokens else None
            out.append(
                TrainingSample(
                    sample_id=sample.feedback_id,
                    prompt_ids=prompt,
                    response_ids=torch.tensor(sample.response_tokens, dtype=torch.long),
                    record_id=record_id,
                    label=Label.DESIRABLE if sample.desirable else Label.UNDESIRABLE,
                    pair=pair,
                )
            )
            if sample.replaced_tokens:
                out.append(
                    TrainingSample(
                        sample_id=f"{sample.feedback_id}/replaced",
                        prompt_ids=prompt,
                        response_ids=torch.tensor(sample.replaced_tokens, dtype=torch.long),
                        record_id=record_id,
                        label=Label.UNDESIRABLE,
                        pair=pair,
                    )
                )
        return out

    @staticmethod
    def _scale_grads(params: Iterable[torch.nn.Parameter], factor: float) -> None:
        if factor == 1.0:
            return
        with torch.no_grad():
            for param in params:
                if param.grad is not None:
                    param.grad.mul_(factor)

    # Checkpointed state.
    def state_dict(self) -> dict[str, Any]:
        """A copy (tensors cloned): the next step must not change a state that is being written to disk."""
        return {
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "step_count": self.step_count,
            "head_version": self.head_version,
            "lineage": sorted(self.lineage),
            "rehearsal": self.rehearsal.state(),
            "unadmitted": RehearsalBuffer.entries_state(self.unadmitted),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step_count"])
        self.head_version = int(state["head_version"])
        self.lineage = set(int(v) for v in state["lineage"])
        self.rehearsal.load(state.get("rehearsal"))
        self.unadmitted = RehearsalBuffer.entries_from_state(state.get("unadmitted", []))

    def committed(self, version: int, passed: bool = True) -> None:
        """The training weights are now those of `version` (just published from them); `passed`: the
        evaluation gate let it through (or there is no gate), so its answers may be rehearsed."""
        self.head_version = version
        self.lineage.add(version)
        self.lr_scale = 1.0  # nothing trained from it was held yet
        self._admit(passed)
        for record_id in self.used_records:
            self.store.pop(record_id)
        self.used_records.clear()

    def _admit(self, passed: bool) -> None:
        if passed:
            self.rehearsal.add(self.unadmitted)
        self.unadmitted = []

    def restore(
        self,
        version: int,
        tensors: dict[str, torch.Tensor],
        state: dict[str, Any] | None,
        passed: bool = True,
        lr_scale: float = 1.0,
    ) -> None:
        """Continues from a committed version: its weights, and its optimizer state when it has one.

        Used at start (resume from the newest version), on rollback (continue from an older one: the lineage
        becomes that version's, so records of the abandoned branch are no longer reused) and when the gate held
        the head (continue from its parent). `passed`: the version's own answers may be rehearsed. `lr_scale`
        multiplies the learning rate of the steps trained from it (evaluation/settings.py: `held_backoff`).
        """
        if self._cursor is not None:
            raise RuntimeError("cannot restore while a step is in progress; cancel it first")
        self.used_records.clear()  # steps no version covers: their records stay for the samples' next step
        self.weights.load_training(tensors)
        if state is not None:
            self.load_state_dict(state)
        else:
            self.optimizer.state.clear()
            self.rehearsal.load(None)
            self.unadmitted = []
        self._admit(passed)
        self.head_version = version
        self.lr_scale = lr_scale
        if state is None or int(state.get("head_version", -1)) != version:
            self.lineage = {version}
