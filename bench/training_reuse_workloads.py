"""Workloads of the training-reuse benchmark: fixed prompt:response ratios and ShareGPT-like conversations.

ShareGPT-like lengths follow the per-turn means the vLLM paper reports for ShareGPT (Kwon et al., "Efficient
Memory Management for Large Language Model Serving with PagedAttention", SOSP 2023, Fig. 11: input 161.31
tokens, output 337.99 tokens on average). The shape is ours, not published: each turn's user and assistant
lengths are log-normal with those means and sigma 0.8, a conversation has 1 to 4 turns (uniform), and the
trained sample is the last assistant answer, whose prompt carries the whole conversation before it (as a
multi-turn chat prompt does). All lengths are multiplied by `scale` (0.25 by default) so that the CPU run fits
in minutes; ratios are unchanged by the scaling.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

SHAREGPT_INPUT_MEAN = 161.31
SHAREGPT_OUTPUT_MEAN = 337.99
SIGMA = 0.8


@dataclass(frozen=True)
class Workload:
    name: str
    shapes: tuple[tuple[int, int], ...]  # (prompt tokens, response tokens) per sample of the step


def _lognormal(rng: random.Random, mean: float) -> float:
    # mean of a log-normal is exp(mu + sigma^2 / 2)
    return rng.lognormvariate(math.log(mean) - SIGMA**2 / 2, SIGMA)


def sharegpt_like(samples: int, *, scale: float, seed: int, max_tokens: int) -> Workload:
    """`samples` conversations' last turns as (prompt, response) lengths, each at most `max_tokens` in all."""
    rng = random.Random(seed)
    shapes = []
    while len(shapes) < samples:
        turns = rng.randint(1, 4)
        history = 0
        for _ in range(turns - 1):
            history += round(
                scale * (_lognormal(rng, SHAREGPT_INPUT_MEAN) + _lognormal(rng, SHAREGPT_OUTPUT_MEAN))
            )
        prompt = history + max(4, round(scale * _lognormal(rng, SHAREGPT_INPUT_MEAN)))
        response = max(4, round(scale * _lognormal(rng, SHAREGPT_OUTPUT_MEAN)))
        if (
            prompt + response <= max_tokens
        ):  # rejection keeps the step's size bounded, as a token budget would
            shapes.append((prompt, response))
    return Workload("sharegpt-like", tuple(shapes))


def fixed_ratio(ratio: int, samples: int, tokens_per_sample: int) -> Workload:
    response = max(1, round(tokens_per_sample / (ratio + 1)))
    return Workload(f"{ratio}:1", tuple((ratio * response, response) for _ in range(samples)))


def default_workloads(samples: int, tokens_per_sample: int, seed: int) -> list[Workload]:
    return [
        fixed_ratio(1, samples, tokens_per_sample),
        fixed_ratio(4, samples, tokens_per_sample),
        fixed_ratio(16, samples, tokens_per_sample),
        sharegpt_like(samples, scale=0.25, seed=seed, max_tokens=2 * tokens_per_sample),
    ]
