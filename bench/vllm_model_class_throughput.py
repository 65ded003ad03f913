"""Throughput at saturation of our vLLM model class against vLLM's own, in one process, bursts interleaved.

bench/serving_load.py runs each configuration as its own worker process, one after the other, so on a shared
machine its saturation numbers mix the model class with load drift (±20% between runs of one configuration).
Here the engines live in one process, recording off, compiled:
- `stock`: vLLM's own model class (`--vllm-model-class stock`);
- `ours`: our class (`AlchemistForCausalLM`), weights as vLLM lays them out for serving alone (on CPU: packed);
- `ours-shared`: our class with the weights kept plain so the trainer computes on views of them (one copy);
- `stock-again`: a second engine of vLLM's class, an A/A control of what this machine resolves (optional).
Each round gives every engine, in a rotating order, the same burst of --burst requests at once (ShareGPT-like
log-normal prompt and output lengths, as serving_load.py; EOS ignored, so every engine does the same work) and
runs it to completion. Reported: output tokens per second per engine (median over rounds) and, per pair, the
median and range of the per-round ratios: the two engines of a round ran back to back, so a slow spell of the
machine weighs on both sides of most ratios. `--profile` then runs one more burst per engine under
torch.profiler and prints the operators with the most CPU time.

    .venv/bin/python bench/vllm_model_class_throughput.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from alchemist_worker.engine.config import EngineConfig
from alchemist_worker.engine.sampling_params import SamplingParams
from alchemist_worker.engine.serving_engine import GenerationRequest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: `bench` importable
from bench.load_trace import add_length_arguments, sharegpt_request, vocab_size_of

# engine name -> (our model class, weights kept plain for the trainer)
ENGINES = {
    "stock": (False, False),
    "ours": (True, False),
    "ours-shared": (True, True),
    "stock-again": (False, False),
}
PAIRS = (("ours", "stock"), ("ours-shared", "stock"), ("ours-shared", "ours"), ("stock-again", "stock"))


def make_burst(rng: random.Random, args: argparse.Namespace, vocab_size: int) -> list[tuple[list[int], int]]:
    """(prompt, output tokens) per request, lengths as serving_load.py's trace."""
    return [sharegpt_request(rng, args, vocab_size) for _ in range(args.burst)]


def run_burst(engine: Any, burst: list[tuple[list[int], int]], tag: str) -> tuple[float, int, int]:
    """Runs every request of `burst` at once to completion: (seconds, output tokens, engine steps)."""
    for i, (prompt, output_len) in enumerate(burst):
        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        engine.add_request(GenerationRequest(f"{tag}-{i}", prompt, params, record=False))
    tokens, steps = 0, 0
    started = time.perf_counter()
    while engine.has_unfinished():
        tokens += sum(len(out.new_token_ids) for out in engine.step())
        steps += 1
    return time.perf_counter() - started, tokens, steps


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="checkpoint (default: SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--engines", default="stock,ours,ours-shared", help=f"from {','.join(ENGINES)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--burst", type=int, default=16, help="requests per burst")
    add_length_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eager", action="store_true", help="no compilation")
    parser.add_argument("--profile", type=int, default=0, help="then profile one burst per engine: top N ops")
    args = parser.parse_args()
    names = args.engines.split(",")
    unknown = set(names) - ENGINES.keys()
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}; choose from {sorted(ENGINES)}")
    if args.model is None:
        from alchemist_worker.bundled_model import ensure_small_model

        args.model = ensure_small_model()
    from alchemist_worker.vllm_backend.engine import VllmEngine

    config = EngineConfig(model=args.model, dtype="float32", max_model_len=1024, kv_cache_bytes=256 << 20)
    engines = {}
    for name in names:
        own, share = ENGINES[name]
        engines[name] = VllmEngine(config, compile=not args.eager, own_model_class=own, share_weights=share)
    rng, vocab_size = random.Random(args.seed), vocab_size_of(args.model)
    rates: dict[str, list[float]] = {name: [] for name in names}
    steps: dict[str, list[float]] = {name: [] for name in names}
    for round_no in range(args.rounds + 1):  # round 0 warms every engine up
        burst = make_burst(
            rng, args, vocab_size
        )  # the same requests for every engine; no engine has seen them
        order = names[round_no % len(names) :] + names[: round_no % len(names)]
        for name in order:
            seconds, tokens, count = run_burst(engines[name], burst, f"r{round_no}")
            if tokens != sum(n for _, n in burst):
                raise SystemExit(f"{name} produced {tokens} tokens, expected {sum(n for _, n in burst)}")
            print(
                f"round {round_no} {name}: {tokens / seconds:.1f} output tok/s", file=sys.stderr, flush=True
            )
            if round_no:
                rates[name].append(tokens / seconds)
                steps[name].append(seconds / count)
    prompts = [len(p) for p, _ in burst]
    print(
        f"vLLM engines in one process, {'eager' if args.eager else 'compiled'}, recording off; {args.rounds} "
        f"rounds of a {args.burst}-request burst per engine (prompt tokens median {args.prompt_median}, max "
        f"{args.prompt_max}; output median {args.output_median}, max {args.output_max}; last burst: "
        f"{sum(prompts)} prompt and {sum(n for _, n in burst)} output tokens); {torch.get_num_threads()} torch "
        f"threads; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n"
    )
    print("| engine | output tok/s, median | min | max | mean step (ms), median |")
    print("|---|---|---|---|---|")
    for name in names:
        print(
            f"| {name} | {statistics.median(rates[name]):.1f} | {min(rates[name]):.1f} | {max(rates[name]):.1f} "
            f"| {1000 * statistics.median(steps[name]):.1f} |"
        )
    print("\n| ratio of output tok/s | median of per-round ratios | min | max | per round |")
    print("|---|---|---|---|---|")
    for a, b in PAIRS:
        if a in rates and b in rates:
            ratios = [x / y for x, y in zip(rates[a], rates[b], strict=True)]
            print(
                f"| {a} / {b} | {statistics.median(ratios):.3f}x | {min(ratios):.3f} | {max(ratios):.3f} "
                f"| {' '.join(f'{r:.2f}' for r in ratios)} |"
            )
    if args.profile:
        burst = make_burst(rng, args, vocab_size)
        for name in names:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                seconds, tokens, count = run_burst(engines[name], burst, "profiled")
            print(f"\n{name}: {tokens / seconds:.1f} output tok/s under the profiler, {count} steps")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
