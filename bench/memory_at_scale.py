"""Memory of co-located training for 7B/8B and 70B models, on paper (byte accounting, nothing is run).

    python -m bench.memory_at_scale --out docs/memory-at-scale.md

Prints the tables of docs/memory-at-scale.md from worker/alchemist_worker/training/memory_budget.py: records
and KV cache per token and per prompt length, weights and optimizer state, what is left on one 80 GB GPU
beside serving, and a training step's record traffic against PCIe and NVLink bandwidth and against the
step's compute. Model shapes are the published configs (config.json) of each model.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.model.config import ModelConfig
from alchemist_worker.training.memory_budget import (
    GB,
    GiB,
    kv_cache_bytes_per_token,
    lora_parameter_count,
    parameter_count,
    plan_gpu,
    record_bytes_per_token,
    replay_flops_per_prompt_token,
    step_transfer_bytes_per_prompt_token,
)

_LLAMA3 = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
)  # fmt: skip
MODELS = {
    "Mistral-7B-v0.1": dict(_LLAMA3, model_type="mistral", vocab_size=32000, rope_theta=10000.0),
    "Llama-3-8B": _LLAMA3,
    "Llama-3-70B": dict(
        _LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64
    ),
}
# (model, tensor-parallel ranks) rows: 70B in bf16 does not fit one 80 GB GPU, so it is also shown sharded
LAYOUTS = [
    ("Mistral-7B-v0.1", 1),
    ("Llama-3-8B", 1),
    ("Llama-3-70B", 1),
    ("Llama-3-70B", 4),
    ("Llama-3-70B", 8),
]
POLICIES = list(RecordingPolicy)
PROMPT_LENGTHS = (1024, 4096, 16384)
# nominal one-direction bandwidths in GB/s
LINKS = {"PCIe 4.0 x16": 32.0, "PCIe 5.0 x16": 64.0, "NVLink-C2C (GH200)": 450.0}
KiB, MiB = 1 << 10, 1 << 20


def render(args: argparse.Namespace) -> str:
    configs = {name: ModelConfig.from_hf(hf) for name, hf in MODELS.items()}
    bf16 = 2
    command = "python -m bench.memory_at_scale " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "# Memory at scale: records, KV cache and training state for 7B/8B and 70B models",
        "",
        f"Command: `{command}` (byte accounting from `alchemist_worker.training.memory_budget`; tests check it "
        "against published parameter counts and against what the recorder and the LoRA code allocate).",
        "",
        "bf16 weights, KV cache and records (the log-sum-exp in fp32). With tensor parallelism over `tp` GPUs "
        "every figure is per GPU: heads and the MLP's width shard, the layer input `x` and the attention's "
        "residual update `o` stay whole on each GPU, and KV heads shard over at most their number of GPUs.",
        "",
        "## Per prompt token",
        "",
        "| model | tp | params | KV cache KiB | record `kv` KiB | `selective` KiB | `full` KiB | `full` / KV |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, tp in LAYOUTS:
        c = configs[name]
        kv = kv_cache_bytes_per_token(c, dtype_bytes=bf16, tp=tp)
        rec = {p: record_bytes_per_token(c, p, dtype_bytes=bf16, tp=tp) for p in POLICIES}
        lines.append(
            f"| {name} | {tp} | {parameter_count(c) / 1e9:.2f} B | {kv / KiB:.0f} | "
            + " | ".join(f"{rec[p] / KiB:.0f}" for p in POLICIES)
            + f" | {rec[RecordingPolicy.FULL] / kv:.1f}x |"
        )
    lines += [
        "",
        "## Per prompt",
        "",
        "| model | tp | prompt tokens | KV cache MiB | record `kv` MiB | `selective` MiB | `full` MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, tp in LAYOUTS:
        c = configs[name]
        for n in PROMPT_LENGTHS:
            kv = n * kv_cache_bytes_per_token(c, dtype_bytes=bf16, tp=tp)
            lines.append(
                f"| {name} | {tp} | {n} | {kv / MiB:.0f} | "
                + " | ".join(
                    f"{n * record_bytes_per_token(c, p, dtype_bytes=bf16, tp=tp) / MiB:.0f}" for p in POLICIES
                )
                + " |"
            )
    serving = args.serving_kv_tokens
    lines += [
        "",
        f"## One {args.gpu_gib} GiB GPU beside serving",
        "",
        f"Serving holds the bf16 weights and a KV cache for {serving} tokens. Training adds its AdamW state: LoRA "
        f"rank {args.lora_rank} on all seven projections (adapters in fp32: parameter, gradient and two moments, "
        "16 B per adapter parameter), or full fine-tuning (a bf16 gradient, an fp32 master copy and two fp32 "
        "moments, 14 B per parameter beyond the serving weights). What is left holds the step's activations and "
        "the records kept on the device; the last columns give how many prompt tokens' records that is if all "
        "of it went to the device tier (records beyond it wait in host memory and stream in layer by layer).",
        "",
        "| model | tp | weights GiB | serving KV GiB | LoRA params | LoRA state GiB | left, LoRA GiB "
        "| prompt tokens of `full` records | of `kv` records | full FT state GiB | left, full FT GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, tp in LAYOUTS:
        c = configs[name]
        lora = plan_gpu(
            c, gpu_bytes=args.gpu_gib * GiB, serving_kv_tokens=serving, lora_rank=args.lora_rank, tp=tp
        )
        full = plan_gpu(c, gpu_bytes=args.gpu_gib * GiB, serving_kv_tokens=serving, lora_rank=None, tp=tp)
        rec_full = record_bytes_per_token(c, RecordingPolicy.FULL, dtype_bytes=bf16, tp=tp)
        rec_kv = record_bytes_per_token(c, RecordingPolicy.KV, dtype_bytes=bf16, tp=tp)
        lines.append(
            f"| {name} | {tp} | {lora.weights / GiB:.1f} | {lora.serving_kv / GiB:.1f} | "
            f"{lora_parameter_count(c, args.lora_rank) / 1e6:.0f} M | {lora.optimizer / GiB:.2f} | "
            f"{_gib(lora.left)} | {lora.prompt_tokens_of_records(rec_full)} | "
            f"{lora.prompt_tokens_of_records(rec_kv)} | {full.optimizer / GiB:.1f} | {_gib(full.left)} |"
        )
    tflops = args.tflops
    lines += [
        "",
        "## Record traffic of a training step against the link and the compute",
        "",
        "Records waiting in host memory cross the host link twice per step, whole layers at a time: once for the "
        "forward (the response attends to each layer's prompt K/V) and once for the backward. The prefetch of "
        "the next layer overlaps the current layer's compute, so the traffic is free while it takes less time "
        "than the compute. Compute per prompt token here is a lower bound: the LoRA backward's input gradients "
        "through every projection plus what the policy recomputes, at "
        f"{tflops:.0f} TFLOP/s (about half of an H100 SXM's dense bf16 peak); attention, which grows with the "
        "prompt, would only add to it. Per GPU under tensor parallelism (each GPU has its own link).",
        "",
        "| model | tp | policy | host-to-device KiB / prompt token | compute us / prompt token | "
        + " | ".join(f"{link} us (x compute)" for link in LINKS)
        + " |",
        "|---|---:|---|---:|---:|" + "---:|" * len(LINKS),
    ]
    for name, tp in LAYOUTS:
        c = configs[name]
        for p in POLICIES:
            moved = step_transfer_bytes_per_prompt_token(c, p, dtype_bytes=bf16, tp=tp)
            compute_us = replay_flops_per_prompt_token(c, p) / tp / (tflops * 1e12) * 1e6
            cells = []
            for bandwidth in LINKS.values():
                us = moved / (bandwidth * GB) * 1e6
                cells.append(f"{us:.1f} ({us / compute_us:.1f}x)")
            lines.append(
                f"| {name} | {tp} | {p.value} | {moved / KiB:.0f} | {compute_us:.1f} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines) + "\n"


def _gib(n: int) -> str:
    return f"{n / GiB:.1f}" if n >= 0 else f"does not fit ({n / GiB:.1f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu-gib", type=int, default=80)
    ap.add_argument("--serving-kv-tokens", type=int, default=65536, help="KV cache reserved for serving")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--tflops", type=float, default=500.0, help="achieved dense bf16 TFLOP/s of the GPU")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    text = render(args)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
