"""Serving and training on one device: what co-location costs each side, measured side by side in one process.

Three configurations run on the same model, the same request trace and the same training backlog:
- serving alone: the engine serves a Poisson trace; the continual trainer is present but disabled;
- training alone: no requests; the trainer works through a backlog of feedback (a steady supply of steps);
- co-located: both at once; the trainer runs in slices between engine iterations (continual/co_scheduler.py).
  Versions are published but serving stays on version 0, so the numbers isolate the cost of training slices;
  with --switching a fourth configuration also switches serving to each new version (the engine's switch
  pauses admission until in-flight requests finish, a cost of its own).
They are interleaved round by round (A, B, C, then B, C, A, ...) so slow drift of a shared machine spreads over
all three. Latencies are taken in the process at the engine's output (no HTTP in the way): TTFT from the
request's scheduled arrival to its first token, inter-token latency as every gap between two tokens of a request.
Training throughput is prompt+response tokens of the steps that ended in the window, between the first and the
last of them, per second of wall time.

Workload: prompts and outputs log-normal like ShareGPT's (heavy right tail), scaled down for a CPU; Poisson
arrivals; generation ignores EOS so every configuration does the same serving work. The training backlog is
feedback on requests served elsewhere (their tokens in Redis), so every sample is recomputed: the same work in
both training configurations. Targets (the issue): p99 TTFT <= 1.15x and p99 ITL <= 1.10x of serving alone,
training >= 50% of its standalone throughput.

    .venv/bin/python bench/colocation.py                      # SmolLM2-135M-Instruct on CPU, writes docs/
    .venv/bin/python bench/colocation.py --seconds 20 --rounds 1 --no-write
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from alchemist_protocol.feedback_client import FeedbackClient
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.local_redis import LocalRedis
from alchemist_protocol.schemas import RequestRecord
from alchemist_worker.continual.runtime import ContinualRuntime, RuntimeSettings
from alchemist_worker.continual.settings import TrainerSettings
from alchemist_worker.engine.config import EngineConfig, RecordingConfig
from alchemist_worker.engine.engine_loop import EngineLoop
from alchemist_worker.engine.llm_engine import LLMEngine
from alchemist_worker.engine.sampling_params import SamplingParams
from alchemist_worker.engine.serving_engine import GenerationRequest, RequestOutput
from alchemist_worker.engine.store_recording import StoreRecording
from alchemist_worker.model.config import ModelConfig
from alchemist_worker.rollout.follower import FollowMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: `bench` importable
from rich import progress as bar

from bench.load_trace import lognormal_length, percentile

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Arrival:
    at_s: float
    prompt: list[int]
    max_tokens: int


@dataclass
class Trace:
    first_token_s: float | None = None
    token_times: list[float] = field(default_factory=list)


def make_trace(args: argparse.Namespace, vocab: int) -> list[Arrival]:
    rng = random.Random(args.seed)
    at, out = 0.0, []
    while True:
        at += rng.expovariate(args.rate)
        if at >= args.seconds:
            return out
        prompt = [
            rng.randrange(10, vocab) for _ in range(lognormal_length(rng, args.prompt_median, 0.9, 8, 512))
        ]
        out.append(Arrival(at, prompt, lognormal_length(rng, args.output_median, 0.6, 4, 128)))


def seed_backlog(store: JobStore, client: FeedbackClient, args: argparse.Namespace, vocab: int) -> int:
    rng = random.Random(args.seed + 1)
    for n in range(args.backlog):
        prompt = [
            rng.randrange(10, vocab)
            for _ in range(lognormal_length(rng, args.train_prompt_median, 0.9, 8, 512))
        ]
        response = [
            rng.randrange(10, vocab)
            for _ in range(lognormal_length(rng, args.train_response_median, 0.6, 4, 256))
        ]
        store.put_request(
            RequestRecord(
                request_id=f"old-{n}", prompt_tokens=prompt, response_tokens=response,
                replica="elsewhere", version=0, model="bench",
            ),
            ttl_seconds=86_400,
        )  # fmt: skip
        client.accept(f"old-{n}")
    return args.backlog


class Run:
    """One configuration: a fresh engine, loop and runtime on the shared model weights' checkpoint."""

    def __init__(
        self, args: argparse.Namespace, redis_url: str, job: str, training: bool, switching: bool
    ) -> None:
        config = EngineConfig(
            model=args.model, dtype="float32", device=args.device, max_model_len=1024,
            kv_cache_bytes=512 << 20, recording=RecordingConfig(policy="selective", rate=1.0), seed=args.seed,
        )  # fmt: skip
        recording = StoreRecording.from_config(
            config.recording, ModelConfig.from_pretrained(args.model), str(args.device)
        )
        self.engine: Any
        if args.engine == "vllm":
            from alchemist_worker.vllm_backend.engine import VllmEngine

            adapter = {"rank": 16, "target_modules": list(TrainerSettings().lora_target_modules)}
            self.engine = VllmEngine(config, recording=recording, adapter=adapter, compile=args.vllm_compile)
        else:
            self.engine = LLMEngine.from_config(config, recording=recording)
        self.loop = EngineLoop(self.engine)
        self.serving_s = 0.0
        self.decode_s: list[float] = []
        self.loop.add_step_observer(self._busy)
        self.versions = Path(tempfile.mkdtemp(prefix="colocation-"))
        trainer = TrainerSettings(
            enabled=training, lora_rank=16, learning_rate=1e-4, batch_samples=args.batch,
            micro_batch_tokens=args.micro_batch_tokens, publish_every_steps=args.publish_every,
            slice_ms=args.slice_ms, max_wait_s=0.0, keep_versions=3,
        )  # fmt: skip
        self.runtime = ContinualRuntime(
            self.loop, self.engine,
            RuntimeSettings(
                redis_url, "bench", job, "bench-0", self.versions, heartbeat_s=1.0,
                follow=FollowMode.LATEST if switching else FollowMode.POINTER,  # no pointer: keep serving v0
            ),
            trainer, model_path=args.model,
        )  # fmt: skip
        self.store = self.runtime.store

    def _busy(self, outputs: list[RequestOutput], elapsed_s: float) -> None:
        self.serving_s += elapsed_s
        if outputs and all(o.num_output_tokens > 1 for o in outputs):
            self.decode_s.append(elapsed_s)

    def start(self) -> None:
        self.runtime.start()
        self.loop.start()

    def stop(self) -> None:
        self.runtime.stop()
        self.loop.stop()

    def trained_tokens(self) -> float:
        value = self.runtime.metrics.registry.get_sample_value("alchemist_training_tokens_total")
        return float(value or 0.0)

    def slice_seconds(self) -> float:
        value = self.runtime.metrics.registry.get_sample_value("alchemist_training_slice_seconds_sum")
        return float(value or 0.0)

    def serve(self, trace: list[Arrival]) -> tuple[list[Trace], float]:
        traces = [Trace() for _ in trace]
        done = threading.Semaphore(0)
        start = time.monotonic() + 0.2

        def sink_for(i: int) -> object:
            def sink(out: RequestOutput | BaseException) -> None:
                now = time.monotonic()
                if isinstance(out, BaseException):
                    done.release()
                    return
                if out.new_token_ids:
                    if traces[i].first_token_s is None:
                        traces[i].first_token_s = now - (start + trace[i].at_s)
                    traces[i].token_times.extend([now] * len(out.new_token_ids))
                if out.finished:
                    done.release()

            return sink

        for i, arrival in enumerate(trace):
            delay = start + arrival.at_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            params = SamplingParams(max_tokens=arrival.max_tokens, temperature=0.0, ignore_eos=True)
            self.loop.submit(
                GenerationRequest(f"r{i}", arrival.prompt, params, arrival_time=start + arrival.at_s),
                sink_for(i),  # type: ignore[arg-type]
            )
        for _ in trace:
            done.acquire(timeout=600)
        return traces, time.monotonic() - start


def latencies(traces: list[Trace]) -> tuple[list[float], list[float]]:
    """(TTFT of each request, every gap between two tokens of a request), seconds."""
    ttft = [t.first_token_s for t in traces if t.first_token_s is not None]
    gaps = [b - a for t in traces for a, b in zip(t.token_times, t.token_times[1:], strict=False)]
    return ttft, gaps


def serving_numbers(ttft: list[float], gaps: list[float]) -> dict[str, float]:
    return {
        "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
        "itl_p50": percentile(gaps, 50), "itl_p99": percentile(gaps, 99),
        "requests": len(ttft), "gaps": len(gaps),
    }  # fmt: skip


class Progress:
    """Training throughput between the first and the last step that ended in the window (steps end in jumps)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.points: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _poll(self) -> None:
        last = self.run.trained_tokens()
        while not self._stop.wait(0.01):
            tokens = self.run.trained_tokens()
            if tokens != last:
                self.points.append((time.monotonic(), tokens))
                last = tokens

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        if len(self.points) < 2:
            return 0.0
        (t0, k0), (t1, k1) = self.points[0], self.points[-1]
        return (k1 - k0) / (t1 - t0)


def measure(
    args: argparse.Namespace, redis: LocalRedis, name: str, round_no: int, pooled: dict[str, list[float]]
) -> dict[str, float]:
    """One run; its latencies are also added to `pooled` (percentiles are taken over all rounds' samples)."""
    job = f"{name}-{round_no}-{time.monotonic_ns()}"
    run = Run(args, redis.url, job, training=name != "serving", switching=name == "switching")
    vocab = run.engine.training_model.config.vocab_size
    if name != "serving":
        seed_backlog(run.store, FeedbackClient(run.store.client, run.store.keys), args, vocab)
    run.start()
    try:
        if name != "serving":  # the trainer takes its lease and finishes a first step before timing begins
            deadline = time.monotonic() + 120
            while run.trained_tokens() == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
        slices0, serving0, t0 = run.slice_seconds(), run.serving_s, time.monotonic()
        progress = Progress(run)
        progress.start()
        if name == "training":
            time.sleep(args.seconds)
            numbers: dict[str, float] = {}
        else:
            traces, _ = run.serve(make_trace(args, vocab))
            ttft, gaps = latencies(traces)
            pooled.setdefault(name + ":ttft", []).extend(ttft)
            pooled.setdefault(name + ":gaps", []).extend(gaps)
            numbers = serving_numbers(ttft, gaps)
        elapsed = time.monotonic() - t0
        numbers["train_tok_s"] = progress.stop()
        numbers["switches"] = float(run.engine.weight_version)
        side = run.runtime.engine_side
        decodes = len(run.decode_s)
        numbers["decode_ms_p50"] = percentile(run.decode_s, 50) * 1000 if decodes else float("nan")
        numbers["busy_slices_per_decode"] = side.busy_slices / decodes if decodes else float("nan")
        numbers["busy_slice_ms_mean"] = (
            side.busy_slice_s / side.busy_slices * 1000 if side.busy_slices else 0.0
        )
        numbers["busy_slice_ms_max"] = side.max_busy_slice_s * 1000
        numbers["load_avg"] = os.getloadavg()[0]  # other processes on a shared machine
        numbers["serving_busy"] = (run.serving_s - serving0) / elapsed  # share of wall time in engine steps
        numbers["training_busy"] = (run.slice_seconds() - slices0) / elapsed  # share in training slices
    finally:
        run.stop()
    return numbers


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="checkpoint (default: SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--engine", choices=("native", "vllm"), default="native")
    parser.add_argument(
        "--vllm-compile", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
        help="vLLM engine compiled (default) or eager",
    )  # fmt: skip
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each measured run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rate", type=float, default=0.3, help="requests per second (Poisson)")
    parser.add_argument("--prompt-median", type=int, default=32)
    parser.add_argument("--output-median", type=int, default=12)
    parser.add_argument("--train-prompt-median", type=int, default=48)
    parser.add_argument("--train-response-median", type=int, default=16)
    parser.add_argument("--backlog", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--micro-batch-tokens", type=int, default=128)
    parser.add_argument("--publish-every", type=int, default=8)
    parser.add_argument("--slice-ms", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (0: torch's default). One by default: on a shared machine a team of OpenMP threads "
        "waits for its slowest member, which turns other people's load into noise",
    )  # fmt: skip
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--switching", action="store_true",
        help="also run co-located with serving switching to each new version (the engine pauses admission)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.threads and args.engine == "native":  # vLLM's CPU attention binds its own threads at start
        torch.set_num_threads(args.threads)
    if args.model is None:
        from alchemist_worker.bundled_model import ensure_small_model

        args.model = ensure_small_model()
    torch.manual_seed(args.seed)
    results: dict[str, list[dict[str, float]]] = {
        "serving": [],
        "training": [],
        "colocated": [],
        "switching": [],
    }
    pooled: dict[str, list[float]] = {}
    names = ["serving", "training", "colocated"] + (["switching"] if args.switching else [])
    orders = [names[i:] + names[:i] for i in range(len(names))]
    hot, cold = idle_penalty()
    print(f"idle penalty: {hot:.2f} ms back to back, {cold:.2f} ms after 0.5 s idle", flush=True)
    # Runs take minutes each: a bar with the time spent on a terminal; elsewhere the lines and the final bar.
    with (
        LocalRedis() as redis,
        bar.Progress(*bar.Progress.get_default_columns(), bar.TimeElapsedColumn()) as progress,
    ):
        runs = progress.add_task("runs", total=args.rounds * len(names))
        for round_no in range(args.rounds):
            for name in orders[round_no % len(orders)]:
                progress.update(runs, description=f"round {round_no} {name} ({args.seconds:g} s trace)")
                numbers = measure(args, redis, name, round_no, pooled)
                results[name].append(numbers)
                progress.console.print(
                    f"round {round_no} {name}: {fmt(numbers)}", markup=False, soft_wrap=True
                )
                progress.advance(runs)
    table = render(args, results, pooled) + (
        f"\nIdle penalty of this machine: a fixed batch of small matmuls takes {hot:.2f} ms back to back and "
        f"{cold:.2f} ms right after 0.5 s of idleness ({cold / hot:.2f}x). Serving alone idles between requests; "
        "co-located, training keeps the CPU busy, so co-located latencies can come out lower than serving "
        "alone. The direct cost line above isolates what a slice adds.\n"
    )
    print(table)
    if not args.no_write:
        suffix = "" if args.engine == "native" else f"_{args.engine}"
        out = ROOT / "docs" / f"colocation_benchmark{suffix}.md"
        out.write_text(table)
        print(f"wrote {out}")
    return 0


def idle_penalty() -> tuple[float, float]:
    """(ms of a fixed small matmul batch back to back, ms of the same right after 0.5 s of idleness).

    On virtual machines (and CPUs with deep power states) work that follows idleness runs slower; serving alone
    idles between requests, co-located serving does not, which favours co-located latencies.
    """
    a, w = torch.randn(8, 576), torch.randn(576, 1536)

    def work() -> float:
        started = time.perf_counter()
        for _ in range(20):
            a @ w
        return (time.perf_counter() - started) * 1000

    for _ in range(50):
        work()
    hot = statistics.median(work() for _ in range(50))
    cold = []
    for _ in range(10):
        time.sleep(0.5)
        cold.append(work())
    return hot, statistics.median(cold)


def fmt(numbers: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in numbers.items())


def median(runs: list[dict[str, float]], key: str) -> float:
    values = [r[key] for r in runs if key in r and not math.isnan(r[key])]
    return statistics.median(values) if values else float("nan")


def render(
    args: argparse.Namespace, results: dict[str, list[dict[str, float]]], pooled: dict[str, list[float]]
) -> str:
    alone = serving_numbers(pooled.get("serving:ttft", []), pooled.get("serving:gaps", []))
    both = serving_numbers(pooled.get("colocated:ttft", []), pooled.get("colocated:gaps", []))
    train = results["training"]
    rows = [
        ("p50 TTFT (ms)", "ttft_p50", 1000.0, None),
        ("p99 TTFT (ms)", "ttft_p99", 1000.0, 1.15),
        ("p50 inter-token (ms)", "itl_p50", 1000.0, None),
        ("p99 inter-token (ms)", "itl_p99", 1000.0, 1.10),
    ]
    lines = [
        "# Co-location: serving and training in one process on one device",
        "",
        "Command:",
        "",
        "```",
        "python bench/colocation.py " + " ".join(sys.argv[1:]),
        "```",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or 'cpu'}; "
        f"device {args.device}; model {Path(args.model).name}; fp32; engine {args.engine}"
        + (f" ({'compiled' if args.vllm_compile else 'eager'})." if args.engine == "vllm" else "."),
        f"Trace: Poisson {args.rate} req/s for {args.seconds:.0f} s, prompts median {args.prompt_median} tokens, "
        f"outputs median {args.output_median} (log-normal, EOS ignored). Training: LoRA r16, batch {args.batch}, "
        f"micro-batches of {args.micro_batch_tokens} tokens, samples median {args.train_prompt_median}+"
        f"{args.train_response_median} tokens (recomputed), a version every {args.publish_every} steps. "
        f"Slices <= {args.slice_ms:.0f} ms. Medians over {args.rounds} interleaved rounds.",
        "",
        "| | serving alone | co-located | ratio | target |",
        "|---|---|---|---|---|",
    ]
    for label, key, scale, target in rows:
        a, b = alone[key] * scale, both[key] * scale
        ratio = b / a if a else float("nan")
        verdict = "" if target is None else (f"<= {target:.2f}x " + ("met" if ratio <= target else "missed"))
        lines.append(f"| {label} | {a:.1f} | {b:.1f} | {ratio:.2f}x | {verdict} |")
    t_alone, t_both = median(train, "train_tok_s"), median(results["colocated"], "train_tok_s")
    ratio = t_both / t_alone if t_alone else float("nan")
    verdict = ">= 0.50x " + ("met" if ratio >= 0.5 else "missed")
    lines.append(
        f"| training tokens/s | {t_alone:.1f} (training alone) | {t_both:.1f} | {ratio:.2f}x | {verdict} |"
    )
    if results["switching"]:
        sw = serving_numbers(pooled.get("switching:ttft", []), pooled.get("switching:gaps", []))
        lines += [
            "",
            "Co-located, and serving switches to each new version as it is published (the engine pauses admission "
            "until in-flight requests finish, see docs/serving.md); "
            f"{median(results['switching'], 'switches'):.0f} switches per run (median):",
            "",
            "| | serving alone | co-located, switching | ratio |",
            "|---|---|---|---|",
        ]
        for label, key, scale, _target in rows:
            a, b = alone[key] * scale, sw[key] * scale
            lines.append(f"| {label} | {a:.1f} | {b:.1f} | {b / a if a else float('nan'):.2f}x |")
    lines += [
        "",
        f"Requests measured: {alone['requests']} alone, {both['requests']} co-located ({alone['gaps']} and "
        f"{both['gaps']} inter-token gaps); latency percentiles pool all rounds, throughputs are medians over rounds.",
        f"Time shares (medians): serving alone spent {median(results['serving'], 'serving_busy'):.0%} of the wall "
        f"time in engine iterations; co-located, serving {median(results['colocated'], 'serving_busy'):.0%} and "
        f"training slices {median(results['colocated'], 'training_busy'):.0%}; training alone computed "
        f"{median(train, 'training_busy'):.0%} of the time.",
        "",
        "Direct cost while serving, co-located (medians over rounds): a training slice ran after "
        f"{median(results['colocated'], 'busy_slices_per_decode'):.0%} of decode iterations, "
        f"{median(results['colocated'], 'busy_slice_ms_mean'):.1f} ms on average "
        f"(longest {median(results['colocated'], 'busy_slice_ms_max'):.0f} ms); the median decode iteration took "
        f"{median(results['serving'], 'decode_ms_p50'):.1f} ms alone and "
        f"{median(results['colocated'], 'decode_ms_p50'):.1f} ms co-located.",
        "",
        "Per run:",
        "",
    ]
    for name, runs in results.items():
        for i, numbers in enumerate(runs):
            lines.append(f"- {name} {i}: {fmt(numbers)}")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
