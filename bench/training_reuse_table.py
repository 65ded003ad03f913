"""Markdown report of the training-reuse benchmark (tables, targets, environment, exact command)."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from typing import Any

from alchemist_worker.model import Transformer

MiB = 1024 * 1024
RECORDING_TARGET = 0.02  # of a prefill step on CPU, for every policy


def render(
    *,
    args: argparse.Namespace,
    argv: list[str],
    model: Transformer,
    plans: list[Any],
    times: dict[tuple[str, str], list[float]],
    walls: dict[tuple[str, str], list[float]],
    memory: dict[tuple[str, str], list[float]],
    prefill_times: dict[tuple[str, str], list[float]],
    hook_times: dict[tuple[str, str], list[float]],
    recorded: dict[tuple[str, str], float],
    costs: Any,
    flops: tuple[Callable[..., float], Callable[..., float]],
    environment: dict[str, Any],
    median: Callable[[list[float]], float],
) -> str:
    baseline_flops, reuse_flops = flops
    c = model.config
    on_cpu = environment["device"].startswith("cpu")
    clock = (
        "CPU (process busy time, not advanced while other users hold the cores)" if on_cpu else "wall-clock"
    )
    unit = "CPU" if on_cpu else "wall"
    command = "python -m bench.training_reuse " + " ".join(shlex.quote(a) for a in argv[1:])
    lines = [
        "# Training-reuse benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Model: random Llama, hidden {c.hidden_size}, {c.num_layers} layers, {c.num_heads} heads x {c.head_dim}, "
        f"{c.num_kv_heads} KV heads, intermediate {c.intermediate_size}, vocab {c.vocab_size}, fp32. LoRA rank "
        f"{args.lora_rank} on all seven projections. {args.samples} samples per step; medians of {args.reps} "
        "round-robin repetitions, after one untimed warm-up step of every method on a tiny workload.",
        "",
        f"Environment: {environment['device']} ({environment['cpu']}), torch {environment['torch']}, "
        f"{environment['threads']} torch thread(s) on a {environment['cores']}-core machine, load average before {fmt_load(environment['load_before'])}, "
        f"after {fmt_load(environment['load_after'])}; whole run {environment['wall_s']:.0f} s. The machine is "
        "shared with other users, so absolute times move between runs; compare the ratios, all measured side by "
        "side in this one run.",
        "",
        "## Training step",
        "",
        f"Times are {clock} seconds per step (median). Speedups are medians of per-repetition ratios against (a) "
        "(a method's time against (a)'s in the same repetition); the wall-clock speedup is shown for reference.",
        "",
        f"| workload | samples p/r | method | step {unit} s | train tok/{unit} s | speedup vs (a) | ideal (FLOPs) "
        "| achieved/ideal | wall speedup | peak act. MiB | memory vs (a) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary = []

    def paired(clock: dict[tuple[str, str], list[float]], workload: str, name: str) -> float:
        """Median over repetitions of (a)'s time over this method's, measured in the same repetition."""
        base, mine = clock[(workload, "(a) full fwd+bwd")], clock[(workload, name)]
        return median([b / m for b, m in zip(base, mine, strict=True)])

    per_token: dict[tuple[str, str], float] = {}
    for w, samples, methods in plans:
        shapes = [(s.prompt_len, s.response_len) for s in samples]
        tokens = sum(p + r for p, r in shapes)
        fa = baseline_flops(c, shapes, costs, full_ft=False, checkpointing=False)
        m_a = median(memory[(w.name, "(a) full fwd+bwd")])
        for name in methods:
            t = median(times[(w.name, name)])
            m = median(memory[(w.name, name)])
            if name.startswith("(b)"):
                kept = c.num_layers * sum(p + r - 1 for p, r in shapes) * c.hidden_size * 4
                m = m + kept + m_a / c.num_layers
                fm = baseline_flops(c, shapes, costs, full_ft=False, checkpointing=True)
            elif name.startswith("reuse"):
                fm = reuse_flops(c, shapes, costs, name.split()[1], full_ft=False)
            else:
                fm = fa
            ideal = fa / fm
            speedup = paired(times, w.name, name)
            mem_note = " (est.)" if name.startswith("(b)") else ""
            lines.append(
                f"| {w.name} | {' '.join(f'{p}/{r}' for p, r in shapes)} | {name} | {t:.2f} | {tokens / t:.0f} | "
                f"{speedup:.2f}x | {ideal:.2f}x | {speedup / ideal:.0%} | {paired(walls, w.name, name):.2f}x | "
                f"{m / MiB:.0f}{mem_note} | "
                f"{m / m_a - 1:+.0%} |"
            )
            if name == "reuse full":
                summary.append((w.name, speedup, ideal, 1 - m / m_a))
            if name in ("(a) full fwd+bwd", "(b) + checkpointing") or name.startswith("reuse"):
                per_token[(w.name, name)] = m / tokens
        summary_hf = 1 / paired(times, w.name, "hf transformers+peft")
        lines.append(
            f"| {w.name} | | (a) vs hf: hf takes {summary_hf:.2f}x the time of (a) | | | | | | | | |"
        )
    budget = args.activation_budget_mib * MiB
    lines += [
        "",
        f"## Trainable tokens per step under a {args.activation_budget_mib} MiB activation-memory budget",
        "",
        "Tokens (prompt + response) of this workload's shape that fit in the budget, from each method's measured "
        "peak activation bytes per token above (every term of that peak grows linearly with the step's "
        "tokens), and the ratio against (a).",
        "",
        "| workload | method | peak act. bytes / token | tokens per step | vs (a) |",
        "|---|---|---:|---:|---:|",
    ]
    budget_ratios = []
    for w, _, methods in plans:
        base_tokens = budget / per_token[(w.name, "(a) full fwd+bwd")]
        for name in methods:
            if (w.name, name) not in per_token:
                continue
            fit = budget / per_token[(w.name, name)]
            mem_note = " (est.)" if name.startswith("(b)") else ""
            lines.append(
                f"| {w.name} | {name} | {per_token[(w.name, name)]:.0f}{mem_note} | {fit:.0f} | "
                f"{fit / base_tokens:.2f}x |"
            )
            if name == "reuse full":
                budget_ratios.append((w.name, fit / base_tokens))
    lines += [
        "",
        "## Prefill with recording",
        "",
        f"| workload | prompt tokens | policy | recorded bytes / prompt token | prefill {unit} ms, no recorder "
        f"| prefill {unit} ms, recording | overhead (difference) | {unit} ms inside the recorder hook "
        "| overhead (hook time / prefill) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    overheads = []
    for w, samples, _ in plans:
        base = median(prefill_times[(w.name, "none")])
        for policy in ("kv", "selective", "full"):
            t = median(prefill_times[(w.name, policy)])
            hook = median(hook_times[(w.name, policy)])
            overheads.append((w.name, policy, t / base - 1, hook / base))
            lines.append(
                f"| {w.name} | {sum(s.prompt_len for s in samples)} | {policy} | "
                f"{recorded[(w.name, policy)]:.0f} | {base * 1e3:.0f} | {t * 1e3:.0f} | {t / base - 1:+.1%} | "
                f"{hook * 1e3:.1f} | {hook / base:.1%} |"
            )
    lines += ["", "## Targets (LoRA, policy `full`, offload on, against (a))", ""]
    for name, speedup, ideal, saved in summary:
        lines.append(
            f"- {name}: speedup {speedup:.2f}x of ideal {ideal:.2f}x = {speedup / ideal:.0%} "
            f"({'met' if speedup / ideal >= 0.92 else 'missed'}: >= 92%); activation memory {saved:.0%} lower "
            f"({'met' if saved >= 0.45 else 'missed'}: >= 45%)"
        )
    for name, ratio in budget_ratios:
        lines.append(
            f"- {name}: trainable tokens per step under the activation budget {ratio:.2f}x (a)'s "
            f"({'met' if ratio >= 2.5 else 'missed'}: >= 2.5x)"
        )
    worst = max(overheads, key=lambda o: o[2])
    worst_hook = max(overheads, key=lambda o: o[3])
    lines.append(
        f"- prefill recording overhead, difference of medians: worst {worst[2]:+.1%} ({worst[0]}, {worst[1]}) "
        f"({'met' if worst[2] <= RECORDING_TARGET else 'missed'}: <= {RECORDING_TARGET:.0%}); time inside the "
        f"recorder hook: worst {worst_hook[3]:.1%} ({worst_hook[0]}, {worst_hook[1]}) "
        f"({'met' if worst_hook[3] <= RECORDING_TARGET else 'missed'}: <= {RECORDING_TARGET:.0%})"
    )
    return "\n".join(lines) + "\n"


def fmt_load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.1f}" for x in load)
