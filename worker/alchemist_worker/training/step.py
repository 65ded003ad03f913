"""One training step's gradient over a batch of feedback samples, reusing records where it can.

    report = accumulate_gradients(model, store, samples, version=v, config=StepConfig())
    optimizer.step()  # the caller owns the optimizer, the version bump and committing the feedback

Each sample is hedged (training/hedging.py): reused samples go through the exact reuse path, the others
through the recompute path, in the same step. Both paths' forwards end in one loss, the objective's mean over
the batch (training/objectives.py: per response token for token-level objectives, per sample for KTO and DPO),
and one backward from it; then the reused prompts' layers are replayed. So the two samples of a DPO pair are
trained together whichever path each takes. The report says, per sample, which path it took and why.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.activations.store import ActivationStore
from alchemist_worker.activations.transfer import LayerStreamer
from alchemist_worker.model.transformer import Transformer
from alchemist_worker.training.batch import TrainingSample, full_batch
from alchemist_worker.training.hedging import Decision, SampleOutcome, decide
from alchemist_worker.training.loss import response_loss_sum
from alchemist_worker.training.objectives import (
    Label,
    Objective,
    ObjectiveConfig,
    kl_to_reference,
    loss_units,
    needs_reference,
    objective_loss,
    spared_tokens,
)
from alchemist_worker.training.recompute import forward_hidden
from alchemist_worker.training.reuse import SuffixForward, reuse_forward, reuse_prompt_backward


@dataclass(frozen=True)
class StepConfig:
    accepted_policies: frozenset[RecordingPolicy] = frozenset(RecordingPolicy)
    max_staleness: int = 0  # versions; 0 keeps every reused gradient exact
    offload: bool = True  # send each record layer back to the host once the step has used it
    consume_records: bool = True  # remove used records from the store after the step
    objective: Objective = Objective.SUPERVISED
    objective_config: ObjectiveConfig = field(default_factory=ObjectiveConfig)


@dataclass
class StepReport:
    loss: float  # the objective's mean over the batch (per response token, or per sample)
    response_tokens: int
    loss_units: int  # what the mean divides by (training/objectives.py: loss_units)
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


def pair_indices(samples: list[TrainingSample]) -> list[tuple[int, int]]:
    """(chosen, rejected) indices of the samples that share a pair key."""
    by_key: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        if s.pair is not None:
            by_key.setdefault(s.pair, []).append(i)
    pairs = []
    for key, members in by_key.items():
        if len(members) != 2 or samples[members[0]].label == samples[members[1]].label:
            raise ValueError(
                f"pair {key!r} needs one desirable and one undesirable sample, got {len(members)}"
            )
        chosen, rejected = sorted(members, key=lambda i: samples[i].label is not Label.DESIRABLE)
        pairs.append((chosen, rejected))
    return pairs


def step_units(samples: list[TrainingSample], objective: Objective) -> int:
    """The denominator of the mean loss over `samples` (see objectives.loss_units)."""
    lengths = [s.response_len for s in samples]
    return sum(loss_units(objective, lengths, [s.label for s in samples], pair_indices(samples)))


def accumulate_gradients(
    model: Transformer,
    store: ActivationStore,
    samples: list[TrainingSample],
    *,
    version: int,
    config: StepConfig = StepConfig(),
) -> StepReport:
    """Adds d(mean loss)/d(params) of `samples` under `config.objective` to the trainable parameters' `.grad`."""
    if not samples:
        raise ValueError("a training step needs at least one sample")
    objective, objective_config = config.objective, config.objective_config
    if needs_reference(objective, objective_config) and any(s.reference_logprobs is None for s in samples):
        raise ValueError(
            f"objective {objective.value} needs reference log-probabilities (training/reference.py)"
        )
    if objective_config.kl_weight > 0 and any(s.reference_log_softmax is None for s in samples):
        raise ValueError("the KL guard needs each sample's reference log-softmax (training/reference.py)")
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
    total = step_units(samples, objective)
    if total == 0:
        raise ValueError(f"objective {objective.value} trains none of these samples")
    record_ids = [s.record_id for s in reused if s.record_id is not None]
    store.acquire(record_ids)
    suffix: SuffixForward | None = None
    try:
        streamer = LayerStreamer(store, record_ids, offload=config.offload)
        # Both paths' response rows, then one loss over all of them (a pair may take one path on each side).
        suffix = reuse_forward(model, reused, streamer) if reused else None
        rows = [suffix.hidden] if suffix is not None else []
        if recomputed:
            batch = full_batch(recomputed, next(model.parameters()).device)
            rows.append(forward_hidden(model, batch)[batch.loss_rows])
        in_order = reused + recomputed
        hidden = rows[0] if len(rows) == 1 else torch.cat(rows)
        objective_fn = objective_loss_fn(model, in_order, config)
        with torch.enable_grad():
            if objective_fn is None:
                labels = torch.cat([s.response_ids for s in in_order]).to(hidden.device)
                loss = response_loss_sum(model, hidden, labels)
            else:
                loss = objective_fn(hidden)
            (loss / total).backward()
        loss_sum = float(loss.detach())
        del hidden, rows
        if suffix is not None:
            suffix.hidden = suffix.hidden.detach()
            reuse_prompt_backward(model, reused, streamer, suffix)
        streamer.synchronize()
    finally:
        if suffix is not None:
            suffix.kept.close()  # the response activations still held: a frozen layer or a failure
        store.release(record_ids)
    if config.consume_records:
        for rid in record_ids:
            store.pop(rid)
    reasons = Counter(o.reason.value for o in outcomes if o.reason is not None)
    return StepReport(
        loss=loss_sum / total,
        response_tokens=sum(s.response_len for s in samples),
        loss_units=total,
        outcomes=outcomes,
        reused_prompt_tokens=sum(s.prompt_len for s in reused),
        recomputed_prompt_tokens=sum(s.prompt_len for s in recomputed),
        reasons=dict(reasons),
    )


def objective_loss_fn(
    model: Transformer, samples: list[TrainingSample], config: StepConfig
) -> Callable[[Tensor], Tensor] | None:
    """The summed loss of `samples` (both halves of each pair among them) from their response rows' hidden
    states, or None for the plain cross-entropy (supervised without the guard: the paths' own, chunked)."""
    plain = config.objective is Objective.SUPERVISED and config.objective_config.kl_weight == 0
    if not samples or (plain and all(s.label is Label.DESIRABLE for s in samples)):
        return None

    def loss(hidden: Tensor) -> Tensor:
        return sample_losses(model, samples, hidden, config).sum()

    return loss


def sample_losses(
    model: Transformer, samples: list[TrainingSample], hidden: Tensor, config: StepConfig
) -> Tensor:
    """[n] per-sample losses (objective + KL guard) from the final-normed hidden states of their response rows."""
    labels = torch.cat([s.response_ids for s in samples]).to(hidden.device)
    lengths = [s.response_len for s in samples]
    logits = model.compute_logits(hidden).float()  # [R, vocab]
    kind, objective_config = config.objective, config.objective_config
    pairs = pair_indices(samples)
    if objective_config.kl_weight > 0:
        log_softmax = torch.log_softmax(logits, dim=-1)
        token_lp = log_softmax.gather(1, labels[:, None]).squeeze(1)
    else:
        token_lp = -F.cross_entropy(logits, labels, reduction="none")  # [R]
    reference = [s.reference_logprobs for s in samples] if needs_reference(kind, objective_config) else None
    spared = spared_tokens([s.response_ids for s in samples], pairs) if kind is Objective.UNLIKELIHOOD else []
    losses = objective_loss(
        kind,
        token_lp.split(lengths),
        reference,  # type: ignore[arg-type]  # accumulate_gradients checked them
        [s.label for s in samples],
        objective_config,
        pairs=pairs,
        spared=spared,
    )
    if objective_config.kl_weight > 0:
        units = loss_units(kind, lengths, [s.label for s in samples], pairs)
        kl = [
            kl_to_reference(rows, s.reference_log_softmax).sum() * (units[i] / s.response_len)
            for i, (rows, s) in enumerate(zip(log_softmax.split(lengths), samples, strict=True))
            if s.reference_log_softmax is not None
        ]
        losses = losses + objective_config.kl_weight * torch.stack(kl)
    return losses
