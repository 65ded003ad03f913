"""Benchmark: training on feedback with prefill-activation reuse against separate-trainer baselines.

    python -m bench.training_reuse --out docs/benchmark-training-reuse.md

For each workload (fixed prompt:response ratios and ShareGPT-like conversations, see
bench/training_reuse_workloads.py), on the same samples and weights, one training step's gradient with LoRA:
  (a)  full forward+backward over prompt+response (our model, no checkpointing),
  (b)  the same with per-layer activation checkpointing,
  (hf) HF transformers + peft on the same shapes, to check that (a) is an honest baseline,
  reuse with each recording policy (kv, selective, full), records streamed from the host tier (offload on).
Methods run round-robin, repetition by repetition, so load from other users of the machine hits them alike;
the table reports medians of step times, and speedups as medians of per-repetition ratios (each repetition
starts with (a) and reuse `full` back to back, see `timing_order`). Ideal speedups come from FLOP counts
(bench/training_reuse_flops.py). Prefill latency is measured without a recorder and with each policy's recorder.

Memory: on CUDA, the allocator's peak during the step. On a CPU there is no allocator peak: it is the peak of
tensors autograd saved for backward (unique storages, weights excluded), plus for reuse the store's device-tier
peak, which counts the records and the response's own activations (kept from the step's forward for its
backward; with offload both stream layer by layer). Checkpointed layers hide their saved tensors from hooks,
so (b) is estimated as what the hooks see, plus the layer inputs it keeps, plus one layer's share of (a).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from alchemist_worker.activations import ActivationStore, RecordingPolicy, StoreConfig
from alchemist_worker.model import load_model
from alchemist_worker.training import LoRAConfig, add_lora

from bench.training_reuse_flops import Costs, baseline_flops, reuse_flops
from bench.training_reuse_steps import (
    Runner,
    build_model_dir,
    busy_clock,
    hf_runner,
    make_samples,
    prefill,
    sync,
)
from bench.training_reuse_workloads import Workload, default_workloads

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
POLICIES = [RecordingPolicy.KV, RecordingPolicy.SELECTIVE, RecordingPolicy.FULL]
MiB = 1024 * 1024


def load_hf(
    path: Path, lora: LoRAConfig, device: torch.device
) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").to(
        device
    )
    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules), lora_dropout=0.0
    )
    hf = get_peft_model(hf, config)
    hf.train()
    return hf, [p for p in hf.parameters() if p.requires_grad]


def timing_order(names: list[str], rep: int) -> list[str]:
    """(a) and reuse `full`, the pair the targets compare, back to back at the start of every repetition, in
    alternating order (whichever runs second may find warmer caches), then the rest: their per-repetition
    ratio sees the same machine even when other users' load drifts within the run."""
    pair = ["(a) full fwd+bwd", "reuse full"]
    pair = pair if rep % 2 else pair[::-1]
    return [*pair, *(n for n in names if n not in pair)]


def time_prefill(model, samples, policy, device) -> tuple[float, float]:
    """(busy seconds of the whole prefill, of which inside the recorder's hook)."""
    clock = busy_clock(device)
    sync(device)
    start = clock()
    _, hook = prefill(model, samples, policy)
    sync(device)
    return clock() - start, hook


def run_benchmark(args: argparse.Namespace) -> str:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    path = build_model_dir(args.cache, args.hidden, args.layers)
    model = load_model(path, device=device)
    lora = LoRAConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank, target_modules=TARGETS)
    params = add_lora(model, lora)
    ours = Runner(model, params, device)
    hf, hf_params = load_hf(path, lora, device)
    hf_timer = Runner(hf, hf_params, device)
    costs = Costs.of(model.config, lora.rank, TARGETS)
    warmup = Workload("warm-up", ((24, 8),) * args.samples)
    chosen = default_workloads(args.samples, args.tokens_per_sample, args.seed)
    if args.workloads:
        chosen = [w for w in chosen if w.name in args.workloads]
    workloads = [warmup, *chosen]
    load_before = os.getloadavg()
    started = time.perf_counter()

    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    walls: dict[tuple[str, str], list[float]] = defaultdict(list)
    memory: dict[tuple[str, str], list[float]] = defaultdict(list)
    prefill_times: dict[tuple[str, str], list[float]] = defaultdict(list)
    hook_times: dict[tuple[str, str], list[float]] = defaultdict(list)
    recorded: dict[tuple[str, str], float] = {}
    plans = []
    for w in workloads:
        samples = make_samples(w, model.config.vocab_size, args.seed)
        stores = {}
        for policy in POLICIES:
            store = ActivationStore(
                StoreConfig(device_budget_bytes=0, host_budget_bytes=1 << 40, device=str(device))
            )
            records = prefill(model, samples, policy)[0] or []
            for s, rec in zip(samples, records, strict=True):
                assert rec is not None and s.record_id is not None
                store.put(s.record_id, rec)
            recorded[(w.name, policy.value)] = store.host_bytes / sum(s.prompt_len for s in samples)
            stores[policy.value] = store
        batched = len(set(w.shapes)) == 1  # equal lengths: one HF batch without padding
        methods: dict[str, Callable[[], tuple[float, float, float]]] = {
            "(a) full fwd+bwd": lambda s=samples: ours.baseline(s, checkpoint=False),
            "(b) + checkpointing": lambda s=samples: ours.baseline(s, checkpoint=True),
            "hf transformers+peft": lambda s=samples, b=batched: hf_timer.timed(hf_runner(hf, s, batched=b)),
        }
        for policy in POLICIES:
            methods[f"reuse {policy.value}"] = lambda s=samples, st=stores[policy.value]: ours.reuse(s, st)
        plans.append((w, samples, methods))

    for rep in range(args.reps + 1):  # round 0 runs every method once on a tiny workload, untimed
        for w, samples, methods in plans:
            if (rep == 0) != (w is warmup):
                continue
            for name in timing_order(list(methods), rep):
                seconds, wall, peak = methods[name]()
                if rep > 0:
                    times[(w.name, name)].append(seconds)
                    walls[(w.name, name)].append(wall)
                    memory[(w.name, name)].append(peak)
            for policy in [None, *POLICIES]:
                seconds, hook = time_prefill(model, samples, policy, device)
                if rep > 0:
                    prefill_times[(w.name, policy.value if policy else "none")].append(seconds)
                    hook_times[(w.name, policy.value if policy else "none")].append(hook)
        print(f"round {rep} done at {time.perf_counter() - started:.0f}s", file=sys.stderr)

    from bench.training_reuse_table import render

    return render(
        args=args,
        argv=sys.argv,
        model=model,
        plans=plans[1:],
        times=times,
        walls=walls,
        memory=memory,
        prefill_times=prefill_times,
        hook_times=hook_times,
        recorded=recorded,
        costs=costs,
        flops=(baseline_flops, reuse_flops),
        environment={
            "device": str(device),
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "wall_s": time.perf_counter() - started,
        },
        median=statistics.median,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--samples", type=int, default=2, help="samples per training step")
    ap.add_argument("--tokens-per-sample", type=int, default=192)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps CPU-time ratios stable)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument(
        "--workloads", nargs="*", default=None, help="run only these (1:1 4:1 16:1 sharegpt-like)"
    )
    ap.add_argument(
        "--activation-budget-mib", type=int, default=1024, help="budget of the trainable-tokens table"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/alchemist-bench"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    args = ap.parse_args(argv)
    text = run_benchmark(args)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
