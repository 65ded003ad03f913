"""Load generator for the serving side: the native and vLLM engines, recording off and under each policy.

Configurations (`--configs`, comma-separated):
- `off`, `kv`, `selective`, `full`: the worker on the native engine with that recording policy;
- `vllm-stock`: the worker on the vLLM engine with vLLM's own model classes (no recording possible);
- `vllm-off`: our model classes, recording off, weights as vLLM lays them out for serving alone (on CPU: packed);
- `vllm-shared`: the same with the weights kept plain so the trainer computes on them (what a training worker runs);
- `vllm-kv`, `vllm-selective`, `vllm-full`: `vllm-shared` recording every request under that policy;
- `vllm`: vLLM's own OpenAI server (`vllm.entrypoints.openai.api_server`), for reference.
The worker's vLLM runs use vLLM's compilation (`--vllm-compile`, default true). vllm-off vs vllm-stock is the cost
of our classes, vllm-shared vs vllm-off the cost of one shared copy of the weights, vllm-<policy> vs vllm-shared
the cost of recording.

Every configuration is a real server process, started in turn, that receives the same trace: requests arrive
as a Poisson process, each streams a completion over the OpenAI API, prompt and output lengths follow
log-normal distributions shaped like ShareGPT's (heavy right tail) and scaled to the machine. Prompts are token
ids and generation ignores EOS, so every server does exactly the same work. Recording runs use rate 1 (every
request recorded): the worst case.

Reported per configuration: output throughput on the trace and (recording off, vLLM) at saturation, when the
same requests arrive at once; p50/p99 time to first token, p50/p99 inter-token latency (every
gap between two streamed tokens), and for recording runs the ratio to the run without recording. Usage:

    .venv/bin/python bench/serving_load.py                       # everything; docs/serving_benchmark.md has a run
    .venv/bin/python bench/serving_load.py --configs off,kv      # a subset, no vLLM
    .venv/bin/python bench/serving_load.py --configs vllm-stock,vllm-off,vllm-kv,vllm-selective,vllm-full,off
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: `bench` importable
from bench.load_trace import add_length_arguments, percentile, random_prompt, sharegpt_request, vocab_size_of

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("off", "kv", "selective", "full")
VLLM_WORKER = ("vllm-off", "vllm-shared", "vllm-kv", "vllm-selective", "vllm-full", "vllm-stock")


@dataclass(frozen=True)
class Arrival:
    at_s: float
    prompt: list[int]
    max_tokens: int


@dataclass
class Result:
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    done_s: float = 0.0
    error: str | None = None


def make_trace(args: argparse.Namespace, vocab_size: int) -> list[Arrival]:
    """ShareGPT-like: prompts log-normal (sigma 0.9), outputs log-normal (sigma 0.6), Poisson arrivals."""
    rng = random.Random(args.seed)
    trace, clock = [], 0.0
    for _ in range(args.requests):
        clock += rng.expovariate(args.rate)
        prompt, output_len = sharegpt_request(rng, args, vocab_size)
        trace.append(Arrival(clock, prompt, output_len))
    return trace


async def one_request(client: httpx.AsyncClient, model: str, arrival: Arrival, start: float) -> Result:
    await asyncio.sleep(max(0.0, start + arrival.at_s - time.perf_counter()))
    sent = time.perf_counter()
    body = {
        "model": model,
        "prompt": arrival.prompt,
        "max_tokens": arrival.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = Result()
    last: float | None = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                if last is None:
                    result.ttft_s = now - sent
                else:
                    result.gaps_s.append(now - last)
                last = now
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.done_s = time.perf_counter() - start
    return result


async def run_trace(url: str, model: str, trace: list[Arrival]) -> tuple[list[Result], float]:
    limits = httpx.Limits(max_connections=len(trace) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        # Warm-up, not measured.
        await one_request(client, model, Arrival(0.0, trace[0].prompt[:8], 4), time.perf_counter())
        start = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, model, a, start) for a in trace))
    return list(results), max(r.done_s for r in results)


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server at {url} not ready within {timeout} s")


def native_command(
    args: argparse.Namespace, policy: str, port: int, engine: str = "native"
) -> tuple[list[str], dict[str, str]]:
    """The worker (`alchemist-worker serve`) on `engine` with recording `policy` (vllm: "stock" too)."""
    model_class = "stock" if policy == "stock" else "alchemist"
    share = policy not in ("stock", "off")  # recording rows run as a training worker would: weights shared
    policy = "off" if policy in ("stock", "shared") else policy
    command = [
        sys.executable, "-m", "alchemist_worker.cli", "serve", "--model", str(args.model), "--port", str(port),
        "--served-model-name", "bench", "--dtype", "float32", "--max-model-len", str(args.max_model_len),
        "--kv-cache-mib", str(args.kv_cache_mib), "--record-policy", policy, "--record-rate", "1.0",
        "--record-device-mib", str(args.record_mib), "--record-host-mib", str(args.record_mib),
        "--log-level", "warning", "--cpu-threads", str(args.cpu_threads), "--engine", engine,
        "--vllm-compile", str(args.vllm_compile).lower(), "--vllm-model-class", model_class,
        "--vllm-share-weights", str(share).lower(),
    ]  # fmt: skip
    return command, {**os.environ, "HF_HUB_OFFLINE": "1"}


def vllm_command(args: argparse.Namespace, port: int) -> tuple[list[str], dict[str, str]]:
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model), "--port", str(port),
        "--host", "127.0.0.1", "--served-model-name", "bench", "--dtype", "float32",
        "--max-model-len", str(args.max_model_len), "--uvicorn-log-level", "warning", "--no-enable-prefix-caching",
    ]  # fmt: skip
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_HOST_IP": "127.0.0.1",
        "HF_HUB_OFFLINE": "1",
    }
    return command, env


def burst_of(trace: list[Arrival], vocab_size: int) -> list[Arrival]:
    """Every request of `trace` at once, with fresh prompts of the same lengths: a prefix cache must not serve
    the burst from the trace's run."""
    rng = random.Random(len(trace))
    return [Arrival(0.0, random_prompt(rng, len(a.prompt), vocab_size), a.max_tokens) for a in trace]


def measure(
    name: str,
    command: list[str],
    env: dict[str, str],
    url: str,
    trace: list[Arrival],
    burst: list[Arrival] | None,
) -> dict[str, object]:
    log = open(ROOT / ".cache" / f"bench-{name}.log", "wb")  # noqa: SIM115 - owned by the child
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(url, process, timeout=300)
        results, makespan = asyncio.run(run_trace(url, "bench", trace))
        metrics = httpx.get(url + "/metrics", timeout=5).text if name != "vllm" else ""  # the worker's
        capacity = float("nan")
        if burst:  # every request at once: output tokens per second at saturation
            burst_results, burst_span = asyncio.run(run_trace(url, "bench", burst))
            capacity = sum(r.output_tokens for r in burst_results) / burst_span
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
    failed = [r.error for r in results if r.error]
    ttfts = [r.ttft_s for r in results if r.ttft_s is not None]
    gaps = [g for r in results for g in r.gaps_s]
    tokens = sum(r.output_tokens for r in results)
    return {
        "name": name,
        "failed": len(failed),
        "first_error": failed[0] if failed else "",
        "throughput": tokens / makespan,
        "capacity": capacity,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p99": percentile(ttfts, 99),
        "itl_p50": percentile(gaps, 50),
        "itl_p99": percentile(gaps, 99),
        "itl_mean": statistics.fmean(gaps) if gaps else float("nan"),
        "recorded_bytes": _metric_sum(metrics, "alchemist_recorded_bytes{"),
        "preemptions": _metric_sum(metrics, "alchemist_preemptions_total"),
    }


def _blank_nan(value: object) -> str:
    number = float(value)  # type: ignore[arg-type]
    return "" if math.isnan(number) else f"{number:.1f}"


def _metric_sum(text: str, prefix: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def _baseline(name: str) -> str | None:
    """The run a row is compared with: recording runs with their engine's run without recording."""
    if name.startswith("native-") and name != "native-off":
        return "native-off"
    if name in ("vllm-kv", "vllm-selective", "vllm-full"):
        return "vllm-shared"
    if name == "vllm-shared":
        return "vllm-off"
    if name == "vllm-off":
        return "vllm-stock"
    return None


def render(
    rows: list[dict[str, object]], args: argparse.Namespace, trace: list[Arrival], command: str
) -> str:
    by_name = {str(r["name"]): r for r in rows}
    lines = [
        "| server | failed | output tok/s | burst output tok/s | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) | ITL p99 (ms) "
        "| compared with | TTFT p50 vs it | ITL p50 vs it | ITL mean vs it | recorded MiB at end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = by_name.get(_baseline(str(r["name"])) or "")

        def ratio(key: str, r: dict[str, object] = r, base: dict[str, object] | None = base) -> str:
            if base is None:
                return ""
            return f"{float(r[key]) / float(base[key]) - 1:+.1%}"  # type: ignore[arg-type]

        lines.append(
            f"| {r['name']} | {r['failed']} | {float(r['throughput']):.1f} | {_blank_nan(r['capacity'])} "  # type: ignore[arg-type]
            f"| {float(r['ttft_p50']):.2f} "  # type: ignore[arg-type]
            f"| {float(r['ttft_p99']):.2f} | {1000 * float(r['itl_p50']):.0f} | {1000 * float(r['itl_p99']):.0f} "  # type: ignore[arg-type]
            f"| {base['name'] if base else ''} | {ratio('ttft_p50')} | {ratio('itl_p50')} | {ratio('itl_mean')} "
            f"| {float(r['recorded_bytes']) / 2**20:.0f} |"  # type: ignore[arg-type]
        )
    prompt_lens = [len(a.prompt) for a in trace]
    output_lens = [a.max_tokens for a in trace]
    summary = [
        f"Command: `{command}`",
        "",
        f"Machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), Python "
        f"{platform.python_version()}, float32, no GPU; native engine with {args.cpu_threads or 'default'} torch "
        f"thread(s), vLLM with its default CPU thread binding, the worker's vLLM engine "
        f"{'compiled' if args.vllm_compile else 'eager'}. Trace: {len(trace)} requests, Poisson arrivals at "
        f"{args.rate}/s (seed {args.seed}), prompt tokens median {statistics.median(prompt_lens):.0f} "
        f"(max {max(prompt_lens)}), output tokens median {statistics.median(output_lens):.0f} "
        f"(max {max(output_lens)}); total {sum(prompt_lens)} prompt and {sum(output_lens)} output tokens.",
        "",
        *lines,
        "",
    ]

    def capacity_ratio(a: str, b: str) -> str:
        ra, rb = by_name.get(a), by_name.get(b)
        if ra is None or rb is None:
            return ""
        return (
            f"- {a} / {b}: {float(ra['capacity']) / float(rb['capacity']):.2f}x output throughput at saturation, "  # type: ignore[arg-type]
            f"{float(ra['throughput']) / float(rb['throughput']):.2f}x on the Poisson trace"  # type: ignore[arg-type]
        )

    for a, b in (
        ("vllm-off", "vllm-stock"),
        ("native-off", "vllm-stock"),
        ("native-off", "vllm"),
        ("vllm-stock", "vllm"),
    ):
        line = capacity_ratio(a, b)
        if line:
            summary.append(line)
    return "\n".join(summary) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: bundled SmolLM2-135M)")
    parser.add_argument("--configs", default="off,kv,selective,full,vllm")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--rate", type=float, default=0.3, help="mean arrivals per second")
    add_length_arguments(parser)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--kv-cache-mib", type=int, default=256)
    parser.add_argument(
        "--record-mib", type=int, default=1024, help="device and host budget of records, each"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cpu-threads", type=int, default=1, help="native engine's torch threads (0: default)"
    )
    parser.add_argument("--port", type=int, default=18431)
    parser.add_argument(
        "--vllm-compile", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
        help="worker's vLLM engine: compiled (true, the default) or eager",
    )  # fmt: skip
    parser.add_argument("--out", default="", help="also write the table to this file (default: print only)")
    args = parser.parse_args()
    if args.model is None:
        from alchemist_worker.bundled_model import ensure_small_model

        args.model = ensure_small_model()
    (ROOT / ".cache").mkdir(exist_ok=True)
    vocab_size = vocab_size_of(args.model)
    trace = make_trace(args, vocab_size)
    burst = burst_of(trace, vocab_size)
    rows = []
    url = f"http://127.0.0.1:{args.port}"
    for config in args.configs.split(","):
        if config == "vllm":
            command, env = vllm_command(args, args.port)
            name = "vllm"
        elif config in POLICIES:
            command, env = native_command(args, config, args.port)
            name = f"native-{config}"
        elif config in VLLM_WORKER:
            command, env = native_command(args, config.removeprefix("vllm-"), args.port, engine="vllm")
            name = config
        else:
            parser.error(f"unknown config {config!r}")
        started = time.monotonic()
        row = measure(
            name,
            command,
            env,
            url,
            trace,
            burst=burst if name in ("native-off", "vllm", "vllm-stock", "vllm-off", "vllm-shared") else None,
        )
        print(f"{name}: {row} ({time.monotonic() - started:.0f} s)", flush=True)
        rows.append(row)
    invocation = "python bench/serving_load.py " + " ".join(sys.argv[1:])
    table = render(rows, args, trace, invocation.strip())
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
