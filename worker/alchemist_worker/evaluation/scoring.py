"""A model's scores on an encoded evaluation set, with yield points so a step cursor can slice the work.

Each item is one forward pass (teacher forcing) over context + targets; the cursor pauses at its decoder
blocks and between row chunks of the vocabulary projection, like a score or a training step, so evaluating a
candidate never holds serving for longer than one slice. Outside a cursor the same code runs in one piece and
gives the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from alchemist_protocol.schemas import EvaluationScores

from alchemist_worker.continual.step_cursor import cursor_yield
from alchemist_worker.evaluation.eval_set import EncodedItem
from alchemist_worker.model.attention import DenseCausalAttention
from alchemist_worker.training.batch import TrainingSample, full_batch

LOGIT_ROWS = 64  # rows of the output projection between two yield points


def item_nll(model: Any, device: torch.device, item: EncodedItem) -> tuple[float, bool]:
    """Summed negative log-likelihood of the item's targets, and whether each target is the argmax."""
    sample = TrainingSample("eval", torch.tensor(item.context), torch.tensor(item.targets))
    batch = full_batch([sample], device)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    greedy = True
    with torch.inference_mode():
        backend = DenseCausalAttention(batch.cu_seqlens, sliding_window=model.config.sliding_window)
        hidden = model(batch.input_ids, batch.positions, backend)[batch.loss_rows]  # [R, hidden]
        for rows, labels in zip(hidden.split(LOGIT_ROWS), batch.labels.split(LOGIT_ROWS), strict=True):
            cursor_yield()
            logits = model.compute_logits(rows).float()  # [r, vocab]
            nll -= torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).sum()
            greedy = greedy and bool((logits.argmax(dim=-1) == labels).all())
    return float(nll), greedy


def score_items(model: Any, device: torch.device, items: Sequence[EncodedItem]) -> EvaluationScores:
    text_nll = ref_nll = 0.0
    text_tokens = ref_tokens = refs = exact = 0
    for item in items:
        cursor_yield()
        nll, greedy = item_nll(model, device, item)
        if item.reference:
            ref_nll += nll
            ref_tokens += len(item.targets)
            refs += 1
            exact += greedy
        else:
            text_nll += nll
            text_tokens += len(item.targets)
    return EvaluationScores(
        perplexity=math.exp(text_nll / text_tokens) if text_tokens else None,
        reference_nll=ref_nll / ref_tokens if ref_tokens else None,
        exact_match=exact / refs if refs else None,
        text_tokens=text_tokens,
        reference_items=refs,
    )
