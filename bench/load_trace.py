"""Pieces shared by the serving-side load benchmarks: request lengths and latency percentiles."""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path


def lognormal_length(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    """A token count from a log-normal with this median, clipped to [low, high] (ShareGPT-like skew)."""
    return max(low, min(high, round(rng.lognormvariate(math.log(median), sigma))))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def add_length_arguments(parser: argparse.ArgumentParser) -> None:
    """--prompt-median/-max and --output-median/-max, read by `sharegpt_request`."""
    parser.add_argument("--prompt-median", type=int, default=64)
    parser.add_argument("--prompt-max", type=int, default=384)
    parser.add_argument("--output-median", type=int, default=24)
    parser.add_argument("--output-max", type=int, default=96)


def vocab_size_of(model: Path) -> int:
    """The vocabulary size in a checkpoint's config.json."""
    return int(json.loads((model / "config.json").read_text())["vocab_size"])


def random_prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    """Token ids of ordinary words: 1000-30000 in a large vocabulary (SmolLM2's 49,152), clear of the special
    tokens at its start; the upper nine tenths of a small one (random test checkpoints)."""
    low, high = (1000, 30000) if vocab_size > 30000 else (vocab_size // 10, vocab_size)
    return [rng.randrange(low, high) for _ in range(length)]


def sharegpt_request(rng: random.Random, args: argparse.Namespace, vocab_size: int) -> tuple[list[int], int]:
    """(prompt token ids, output tokens): prompts log-normal (sigma 0.9), outputs log-normal (sigma 0.6)."""
    prompt_len = lognormal_length(rng, args.prompt_median, 0.9, 8, args.prompt_max)
    output_len = lognormal_length(rng, args.output_median, 0.6, 4, args.output_max)
    return random_prompt(rng, prompt_len, vocab_size), output_len
