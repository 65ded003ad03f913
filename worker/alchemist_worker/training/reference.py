"""Reference log-probabilities: the response tokens under the base model, for KTO, DPO and the KL guard.

The reference is the base model (version 0: the adapter disabled under LoRA, the weights as loaded under full
fine-tuning, whose frozen copy the trainer keeps anyway for rollbacks). The caller installs those weights and
this runs a forward without gradients over prompt + response, one per sample and step. Why not the
log-probabilities the engine computed while decoding, which cost no forward: a correction was never decoded, so
it has none, and DPO and KTO need them for exactly those answers; they belong to whichever version served the
request, so the reference would move under the objective (its log ratios would measure change since serving,
not since the base, and a KL guard on them would not bound drift from the base); and vLLM reports them after
its sampling processors (temperature, penalties), not the model's own. The forward's cost is measured by
bench/objectives.py.

The prompt's prefill record cannot stand in for the prompt part of this forward: it was made under the served
adapter, not the base.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from alchemist_worker.model.transformer import Transformer
from alchemist_worker.training.batch import TrainingSample, full_batch
from alchemist_worker.training.recompute import forward_hidden


@torch.no_grad()
def with_reference(
    model: Transformer, samples: list[TrainingSample], *, log_softmax: bool = False
) -> list[TrainingSample]:
    """`samples` with `reference_logprobs` (and, when asked, `reference_log_softmax`) from `model` as it is
    now: the caller installs the reference weights first."""
    if not samples:
        return []
    device = next(model.parameters()).device
    batch = full_batch(samples, device)
    hidden = forward_hidden(model, batch)[batch.loss_rows]
    logp = torch.log_softmax(model.compute_logits(hidden).float(), dim=-1)  # [R, vocab]
    tokens = logp.gather(1, batch.labels[:, None]).squeeze(1)  # [R]
    lengths = [s.response_len for s in samples]
    full = logp.split(lengths) if log_softmax else [None] * len(samples)
    return [
        replace(s, reference_logprobs=t, reference_log_softmax=f)
        for s, t, f in zip(samples, tokens.split(lengths), full, strict=True)
    ]
