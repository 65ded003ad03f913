"""One training step's gradient over a batch of feedback samples, reusing records where it can.

    report = accumulate_gradients(model, store, samples, version=v, config=StepConfig())
    optimizer.step()  # the caller owns the optimizer, the version bump and committing the feedback

Each sample is hedged (training/hedging.py): reused samples go through the exact reuse path, the others
through the recompute path, in the same step, and the loss is the mean over all response tokens of the
batch either way. The report says, per sample, which path it took and why.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.activations.store import ActivationStore
from alchemist_worker.activations.transfer import LayerStreamer
from alchemist_worker.model.transformer import Transformer
from alchemist_worker.training.batch import TrainingSample
from alchemist_worker.training.hedging import Decision, SampleOutcome, decide
from alchemist_worker.training.recompute import recompute_backward
from alchemist_worker.training.reuse import reuse_backward


@dataclass(frozen=True)
class StepConfig:
    accepted_policies: frozenset[RecordingPolicy] = frozenset(RecordingPolicy)
    max_staleness: int = 0  # versions; 0 keeps every reused gradient exact
    offload: bool = True  # send each record layer back to the host once the step has used it
    consume_records: bool = True  # remove used records from the store after the step


@dataclass
class StepReport:
    loss: float  # mean cross-entropy over the batch's response tokens
    response_tokens: int
    outcomes: list[SampleOutcome]
    reused_prompt_tokens: int = 0
    recomputed_prompt_tokens: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # Reason -> samples recomputed for it

    @property
    def reused(self) -> int:
        return sum(o.decision is Decision.REUSED for o in self.outcomes)

    @property
    def recomputed(self) -> int:
        return sum(o.decision is Decision.RECOMPUTED for o in self.outcomes)


def accumulate_gradients(
    model: Transformer,
    store: ActivationStore,
    samples: list[TrainingSample],
    *,
    version: int,
    config: StepConfig = StepConfig(),
) -> StepReport:
    """Adds d(mean response loss)/d(params) of `samples` to the trainable parameters' `.grad`."""
    if not samples:
        raise ValueError("a training step needs at least one sample")
    outcomes = [
        decide(
            s,
            store.lookup(s.record_id) if s.record_id is not None else None,
            model_config=model.config,
            accepted_policies=config.accepted_policies,
            current_version=version,
            max_staleness=config.max_staleness,
        )
        for s in samples
    ]
    reused = [s for s, o in zip(samples, outcomes, strict=True) if o.decision is Decision.REUSED]
    recomputed = [s for s, o in zip(samples, outcomes, strict=True) if o.decision is Decision.RECOMPUTED]
    total = sum(s.response_len for s in samples)
    record_ids = [s.record_id for s in reused if s.record_id is not None]
    store.acquire(record_ids)
    try:
        streamer = LayerStreamer(store, record_ids, offload=config.offload)
        loss_sum = reuse_backward(model, reused, streamer, scale=1.0 / total)
        streamer.synchronize()
        loss_sum += recompute_backward(model, recomputed, scale=1.0 / total)
    finally:
        store.release(record_ids)
    if config.consume_records:
        for rid in record_ids:
            store.pop(rid)
    reasons = Counter(o.reason.value for o in outcomes if o.reason is not None)
    return StepReport(
        loss=loss_sum / total,
        response_tokens=total,
        outcomes=outcomes,
        reused_prompt_tokens=sum(s.prompt_len for s in reused),
        recomputed_prompt_tokens=sum(s.prompt_len for s in recomputed),
        reasons=dict(reasons),
    )
