"""Chooses the next token of every sequence in a batch from its logits, each under its own parameters.

Greedy rows take the argmax. Other rows apply penalties, temperature, top-k and top-p, then draw with the
exponential race (argmax of p / E, E ~ Exp(1)), which equals sampling from p. A request with a seed draws its
noise from its own generator, so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from alchemist_worker.engine.sampling_params import SamplingParams
from alchemist_worker.engine.sequence import TokenLogprob


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def apply_penalties(logits: torch.Tensor, params: SamplingParams, output_ids: Sequence[int]) -> None:
    """OpenAI's presence and frequency penalties over the tokens generated so far; in place on one row."""
    if not output_ids:
        return
    # logits: [vocab]
    counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=logits.shape[-1]).to(
        logits.dtype
    )
    logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)


def filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p. logits: [rows, vocab] -> [rows, vocab]."""
    temps = torch.tensor([p.temperature for p in params], device=logits.device, dtype=logits.dtype)
    scaled = logits / temps.unsqueeze(1)
    vocab = logits.shape[-1]
    if all((p.top_k <= 0 or p.top_k >= vocab) and p.top_p >= 1.0 for p in params):
        return torch.softmax(scaled, dim=-1)
    ordered, order = scaled.sort(dim=-1, descending=True)  # [rows, vocab]
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    ks = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=logits.device)
    ordered = ordered.masked_fill(ranks >= ks.unsqueeze(1), float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    top_ps = torch.tensor([p.top_p for p in params], device=logits.device, dtype=probs.dtype)
    # Drop a token when the tokens ranked above it already reach top_p; the first token always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    ordered = ordered.masked_fill(mass_before >= top_ps.unsqueeze(1), float("-inf"))
    probs_sorted = torch.softmax(ordered, dim=-1)
    return torch.zeros_like(probs_sorted).scatter_(-1, order, probs_sorted)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_ids: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None],
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Next token per row, and its log probabilities when the row asked for them.

    logits: [rows, vocab] (any float dtype); one entry of `params`, `output_ids` and `generators` per row.
    """
    logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in params) else None
    rows = logits.shape[0]
    chosen = torch.empty(rows, dtype=torch.long, device=logits.device)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if greedy:
        idx = torch.tensor(greedy, device=logits.device)
        greedy_logits = logits[idx]
        for row, i in enumerate(greedy):
            if params[i].penalized:
                apply_penalties(greedy_logits[row], params[i], output_ids[i])
        chosen[idx] = greedy_logits.argmax(dim=-1)
    if sampled:
        idx = torch.tensor(sampled, device=logits.device)
        sub = logits[idx]
        for row, i in enumerate(sampled):
            if params[i].penalized:
                apply_penalties(sub[row], params[i], output_ids[i])
        probs = filtered_probs(sub, [params[i] for i in sampled])  # [len(sampled), vocab]
        noise = torch.empty_like(probs)
        for row, i in enumerate(sampled):
            noise[row].exponential_(generator=generators[i])
        chosen[idx] = (probs / noise).argmax(dim=-1)
    token_ids: list[int] = chosen.tolist()
    out: list[TokenLogprob | None] = [None] * rows
    if raw_logprobs is not None:
        for i, p in enumerate(params):
            if p.logprobs is None:
                continue
            top: list[tuple[int, float]] = []
            if p.logprobs > 0:
                values, indices = raw_logprobs[i].topk(p.logprobs)
                top = list(zip(indices.tolist(), values.tolist(), strict=True))
            out[i] = TokenLogprob(token_ids[i], float(raw_logprobs[i, token_ids[i]]), top)
    return token_ids, out
