"""The response loss: cross-entropy over the vocabulary, computed a chunk of rows at a time.

Over a large vocabulary the output projection and its softmax are a training step's largest operators and its
largest tensors: [rows, vocab] logits in fp32, kept by autograd for backward together with their softmax.
Here each chunk of rows computes its logits, its loss and the gradient of that loss with respect to its hidden
states at once, keeps only that gradient, and drops the logits. Backward only scales it by the incoming
gradient. So:
- no [rows, vocab] tensor outlives its chunk (memory: one chunk's logits instead of all rows' twice), unless
  the projection itself trains (full fine-tuning), where the logits' gradient is kept for its weight gradient;
- the longest indivisible operator is one chunk's, and each chunk saves its result through autograd, which
  gives a sliced step a yield point between chunks (continual/step_cursor.py);
- the numbers are those of `F.cross_entropy` over the full logits: rows are independent, the softmax is taken
  over each row's whole vocabulary in fp32, and the gradient is softmax minus one-hot, as autograd computes it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from alchemist_worker.model.transformer import Transformer

# Logits per chunk: rows = this // vocab, at least one. Every chunk streams the whole output projection twice
# (logits, then the hidden-state gradient), so smaller chunks shorten the longest operator but lengthen the
# loss: on a CPU, SmolLM2's vocabulary (49152) gives 21-row chunks of about 60 ms each, with the whole loss
# about 1.5x the unchunked one. A GPU reads the weight far faster and wants wide GEMMs: bigger chunks.
LOGIT_ELEMENTS = 1 << 20  # 4 MiB of fp32 logits
LOGIT_ELEMENTS_CUDA = 1 << 24  # 64 MiB


def chunk_rows(vocab_size: int, device: torch.device | None = None) -> int:
    elements = LOGIT_ELEMENTS_CUDA if device is not None and device.type == "cuda" else LOGIT_ELEMENTS
    return max(1, elements // vocab_size)


class _ChunkCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of one chunk of rows through the output projection; gradients made in forward."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        logits = F.linear(hidden, weight).float()  # [c, vocab]
        lse = torch.logsumexp(logits, dim=-1)
        loss = (lse - logits.gather(1, labels[:, None])[:, 0]).sum()
        dlogits = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
        dlogits[torch.arange(labels.shape[0], device=labels.device), labels] -= 1.0
        dlogits = dlogits.to(hidden.dtype)
        dhidden = dlogits @ weight if ctx.needs_input_grad[0] else None
        if ctx.needs_input_grad[1]:  # a [vocab, h] gradient per chunk would not fit: made in backward instead
            ctx.save_for_backward(dhidden, dlogits, hidden)
        else:
            ctx.save_for_backward(dhidden, None, None)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        dhidden, dlogits, hidden = ctx.saved_tensors
        dweight = (dlogits.t() @ hidden) * grad if dlogits is not None else None
        return (dhidden * grad if dhidden is not None else None, dweight, None)


def chunked_cross_entropy_sum(hidden: Tensor, weight: Tensor, labels: Tensor, *, rows: int) -> Tensor:
    """sum_i CE(hidden[i] @ weight^T, labels[i]) in fp32, differentiable in hidden and weight, `rows` at a time.

    hidden: [R, h]; weight: [vocab, h]; labels: [R] int64.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros((), dtype=torch.float32)
    parts = [
        _ChunkCrossEntropy.apply(h, weight, y)
        for h, y in zip(hidden.split(rows), labels.split(rows), strict=True)
    ]
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()


def response_loss_sum(model: Transformer, hidden_rows: Tensor, labels: Tensor) -> Tensor:
    """Summed cross-entropy (fp32) of `labels` [R] from final-normed hidden states [R, hidden]."""
    head = model.lm_head
    if head.bias is not None:  # not a Llama-family head; the plain path handles it
        return F.cross_entropy(model.compute_logits(hidden_rows).float(), labels, reduction="sum")
    rows = chunk_rows(head.weight.shape[0], hidden_rows.device)
    return chunked_cross_entropy_sum(hidden_rows, head.weight, labels, rows=rows)
