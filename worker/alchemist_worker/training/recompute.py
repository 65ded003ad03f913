"""The recompute path: forward and backward over prompt + response, as a separate trainer would run it.

It is the reference the reuse path must equal, the fallback when a sample's record cannot be used (hedging),
and, with `checkpoint_layers`, the per-layer activation checkpointing baseline of the benchmark.
"""

from __future__ import annotations

from torch import Tensor
from torch.utils.checkpoint import checkpoint

from alchemist_worker.model.attention import DenseCausalAttention
from alchemist_worker.model.transformer import Transformer
from alchemist_worker.training.batch import FlatBatch, TrainingSample, full_batch
from alchemist_worker.training.loss import response_loss_sum


def forward_hidden(model: Transformer, batch: FlatBatch, *, checkpoint_layers: bool = False) -> Tensor:
    """Final-normed hidden states [T, hidden] over a flat batch, optionally checkpointing each layer."""
    backend = DenseCausalAttention(batch.cu_seqlens, sliding_window=model.config.sliding_window)
    if not checkpoint_layers:
        return model(batch.input_ids, batch.positions, backend)
    x = model.embed_tokens(batch.input_ids)
    cos, sin = model.rope(batch.positions, x.dtype)
    for block in model.layers:
        x = checkpoint(block, x, cos, sin, backend, use_reentrant=False)
    return model.norm(x)


def recompute_backward(
    model: Transformer, samples: list[TrainingSample], *, scale: float, checkpoint_layers: bool = False
) -> float:
    """Accumulates scale * d(summed response loss)/d(params) into `.grad`; returns the summed loss."""
    if not samples:
        return 0.0
    device = next(model.parameters()).device
    batch = full_batch(samples, device)
    hidden = forward_hidden(model, batch, checkpoint_layers=checkpoint_layers)
    loss_sum = response_loss_sum(model, hidden[batch.loss_rows], batch.labels)
    (loss_sum * scale).backward()
    return float(loss_sum.detach())


def recompute_loss(model: Transformer, samples: list[TrainingSample]) -> Tensor:
    """Mean response-token loss of the batch, with its graph (for callers that want to backward themselves)."""
    device = next(model.parameters()).device
    batch = full_batch(samples, device)
    hidden = forward_hidden(model, batch)
    return response_loss_sum(model, hidden[batch.loss_rows], batch.labels) / batch.labels.numel()
