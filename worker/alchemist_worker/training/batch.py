"""Training samples and their flat (unpadded) token layouts.

A sample is a prompt of p tokens and a response of r tokens; the loss is the cross-entropy of the response
tokens, each predicted from everything before it. So the logits that matter are those of the last prompt
token and of the first r - 1 response tokens: the last response token is never an input that matters.

The reuse path splits a sample at that boundary:
- prefix: prompt tokens 0 .. p-2 (p - 1 tokens), rebuilt from the prefill record;
- suffix: prompt token p-1 and response tokens 0 .. r-2 (r tokens) at positions p-1 .. p+r-2, computed
  afresh, with labels response 0 .. r-1.
The recompute path runs prefix and suffix together (p + r - 1 tokens) and takes the logits of the same r
positions. Sequences are concatenated without padding, so nothing of one sample reaches another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from alchemist_worker.training.objectives import Label


@dataclass(frozen=True)
class TrainingSample:
    sample_id: str
    prompt_ids: Tensor  # [p] int64, p >= 1
    response_ids: Tensor  # [r] int64, r >= 1
    record_id: str | None = None  # key of the prompt's prefill record in the activation store
    label: Label = Label.DESIRABLE
    pair: str | None = None  # the two samples of a preference pair (same prompt) share this key
    # Under the reference model (training/reference.py), constants: log-prob of each response token [r], and
    # the whole log-softmax [r, vocab] when the forgetting guard needs it.
    reference_logprobs: Tensor | None = None
    reference_log_softmax: Tensor | None = None

    def __post_init__(self) -> None:
        if self.prompt_ids.ndim != 1 or self.prompt_ids.numel() < 1:
            raise ValueError(f"sample {self.sample_id}: prompt_ids must be a non-empty 1-D tensor")
        if self.response_ids.ndim != 1 or self.response_ids.numel() < 1:
            raise ValueError(f"sample {self.sample_id}: response_ids must be a non-empty 1-D tensor")

    @property
    def prompt_len(self) -> int:
        return int(self.prompt_ids.numel())

    @property
    def response_len(self) -> int:
        return int(self.response_ids.numel())

    @property
    def prefix_len(self) -> int:
        return self.prompt_len - 1


def offsets(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


@dataclass(frozen=True)
class FlatBatch:
    """Tokens of several sequences laid end to end."""

    input_ids: Tensor  # [T]
    positions: Tensor  # [T]
    cu_seqlens: list[int]  # [n + 1]
    loss_rows: Tensor  # [R] rows whose logits predict a label
    labels: Tensor  # [R]


def full_batch(samples: list[TrainingSample], device: torch.device) -> FlatBatch:
    """Prompt + response without the last response token, for the recompute path."""
    ids, rows, cu = [], [], [0]
    for s in samples:
        seq = torch.cat([s.prompt_ids, s.response_ids[:-1]])
        rows.append(torch.arange(s.prompt_len - 1, seq.numel()) + cu[-1])
        ids.append(seq)
        cu.append(cu[-1] + seq.numel())
    return FlatBatch(
        input_ids=torch.cat(ids).to(device),
        positions=torch.cat([torch.arange(t.numel()) for t in ids]).to(device),
        cu_seqlens=cu,
        loss_rows=torch.cat(rows).to(device),
        labels=torch.cat([s.response_ids for s in samples]).to(device),
    )


def suffix_batch(samples: list[TrainingSample], device: torch.device) -> FlatBatch:
    """Last prompt token + response without its last token, at their true positions, for the reuse path."""
    ids = [torch.cat([s.prompt_ids[-1:], s.response_ids[:-1]]) for s in samples]
    positions = [torch.arange(s.prefix_len, s.prefix_len + s.response_len) for s in samples]
    total = sum(s.response_len for s in samples)
    return FlatBatch(
        input_ids=torch.cat(ids).to(device),
        positions=torch.cat(positions).to(device),
        cu_seqlens=offsets([s.response_len for s in samples]),
        loss_rows=torch.arange(total, device=device),
        labels=torch.cat([s.response_ids for s in samples]).to(device),
    )
