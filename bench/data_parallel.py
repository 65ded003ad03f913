"""Data-parallel continual learning on this machine: 1, 2 and 3 training members, and 3 replicas with one trainer.

Configurations (`--configs`, comma-separated):
- `dp1`, `dp2`, `dp3`: that many worker processes, all training in one group (ALCHEMIST_DATA_PARALLEL);
- `lease3`: three worker processes, one of which (the trainer-lease holder) trains: the mode before.
Each configuration is real worker processes on a private Redis, a tiny random checkpoint (or `--model`). The
same workload runs in each: every replica serves `--requests` requests (full recording), then every response is
accepted at once through one replica's API, and the job trains until every feedback id is in a version. While
it trains, a probe sends short completions to one replica, one at a time, and records their latency; the same
probe runs for a few seconds before the feedback, for the idle reference.

Reported per configuration: training throughput (samples and response tokens per second, from the first
feedback to the last version), rounds (versions), the share of a round spent communicating (all-reduce, gather
and the commit's broadcast, from the members' own accounting, leader excluded from the commit time), the reuse
rate (samples trained on their prefill record / all samples), and the probe's p50/p99 latency before and while
training. Ratios are only meaningful side by side in one run; the load average is printed with the table. Usage:

    .venv/bin/python bench/data_parallel.py                          # docs/data-parallel.md has a run
    .venv/bin/python bench/data_parallel.py --configs dp1,dp2 --requests 8
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: `tests` importable
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import JobKeys
from alchemist_protocol.local_redis import LocalRedis, free_port
from alchemist_worker.versions.directory import VersionDirectory

from bench.load_trace import percentile

KEYS = JobKeys("bench", "dp")
PROMPTS = ["hello there", "def add(a, b):", "the quick brown fox", "once upon a time", "print(1)", "a b c d"]


@dataclass
class Row:
    config: str
    samples: int
    tokens: int
    seconds: float
    versions: int
    comm_share: float | None
    reuse: float
    idle_p50: float
    idle_p99: float
    busy_p50: float
    busy_p99: float


def worker_env(
    args: argparse.Namespace, redis_url: str, versions: Path, replica: str, dp: bool
) -> dict[str, str]:
    env = {
        **os.environ,
        "ALCHEMIST_MODEL": str(args.model),
        "ALCHEMIST_PORT": str(free_port()),
        "ALCHEMIST_DTYPE": "float32",
        "ALCHEMIST_DEVICE": "cpu",
        "ALCHEMIST_KV_CACHE_MIB": "16",
        "ALCHEMIST_MAX_MODEL_LEN": "256",
        "ALCHEMIST_REDIS_URL": redis_url,
        "ALCHEMIST_NAMESPACE": KEYS.namespace,
        "ALCHEMIST_JOB": KEYS.job,
        "ALCHEMIST_REPLICA": replica,
        "ALCHEMIST_VERSIONS_DIR": str(versions),
        "ALCHEMIST_RECORD_POLICY": "full",
        "ALCHEMIST_RECORD_RATE": "1",
        "ALCHEMIST_HEARTBEAT_SECONDS": "0.5",
        "ALCHEMIST_TRAINER_LEASE_SECONDS": "3",
        "ALCHEMIST_TRAINING_LORA_RANK": "8",
        "ALCHEMIST_TRAINING_BATCH_SIZE": str(args.batch),
        "ALCHEMIST_TRAINING_MIN_BATCH_SIZE": str(args.batch),
        "ALCHEMIST_TRAINING_MAX_WAIT_SECONDS": "1",
        "ALCHEMIST_TRAINING_MAX_STALENESS": "1000",  # the reuse rate then counts routing, not staleness
        "ALCHEMIST_TRAINING_KEEP_VERSIONS": "1000",
        "ALCHEMIST_LOG_LEVEL": "warning",
    }
    if dp:
        env |= {
            "ALCHEMIST_DATA_PARALLEL": "1",
            "ALCHEMIST_DP_ADDRESS": "127.0.0.1",
            "ALCHEMIST_DP_PORT": str(free_port()),
            "ALCHEMIST_DP_ROUND_TIMEOUT_SECONDS": "30",
            "ALCHEMIST_DP_POLL_SECONDS": "0.05",
            "GLOO_SOCKET_IFNAME": "lo",
        }
    return env


def start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "alchemist_worker.cli", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():  # type: ignore[operator]
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def complete(url: str, model: str, n: int, max_tokens: int) -> str:
    body = {"model": model, "prompt": PROMPTS[n % len(PROMPTS)] + f" {n}", "max_tokens": max_tokens}
    response = httpx.post(url + "/v1/completions", json=body, timeout=60)
    response.raise_for_status()
    return str(response.json()["id"])


class Probe:
    """Short completions to one replica, one at a time; their latencies in seconds."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 10_000
        while not self._stop.is_set():
            started = time.perf_counter()
            complete(self.url, self.model, n, 8)
            self.latencies.append(time.perf_counter() - started)
            n += 1

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def run_config(args: argparse.Namespace, config: str, work: Path) -> Row:
    replicas, dp = {"dp1": (1, True), "dp2": (2, True), "dp3": (3, True), "lease3": (3, False)}[config]
    root = work / config
    root.mkdir()
    redis_server = LocalRedis(port=free_port())
    redis_server.start()
    store = JobStore.from_url(redis_server.url, KEYS.namespace, KEYS.job)
    envs = [worker_env(args, redis_server.url, root / "versions", f"r{n}", dp) for n in range(replicas)]
    urls = [f"http://127.0.0.1:{env['ALCHEMIST_PORT']}" for env in envs]
    processes = [start(env, root / f"r{n}.log") for n, env in enumerate(envs)]
    model = args.model.name
    try:
        for url in urls:
            wait_until(lambda u=url: httpx.get(u + "/readyz", timeout=2).status_code == 200, 180, "ready")
        if dp:

            def grouped() -> bool:
                states = [httpx.get(u + "/v1/versions", timeout=5).json()["worker"] for u in urls]
                return all((s.get("data_parallel") or {}).get("world_size") == replicas for s in states)

            wait_until(grouped, 120, f"a group of {replicas}")
        served = [
            complete(urls[n % replicas], model, n, args.max_tokens) for n in range(args.requests * replicas)
        ]
        for rid in served:
            wait_until(lambda r=rid: store.get_request(r) is not None, 30, "request records")
        with Probe(urls[0], model) as idle:
            time.sleep(args.probe_seconds)
        with Probe(urls[0], model) as busy:
            started = time.perf_counter()
            for rid in served:
                body = {"response_id": rid, "label": "accept", "idempotency_key": f"fb-{rid}"}
                httpx.post(urls[0] + "/v1/feedback", json=body, timeout=30).raise_for_status()
            wanted = {f"fb-{rid}" for rid in served}

            directory = VersionDirectory(root / "versions")

            def trained() -> bool:
                done = {
                    fb.feedback_id for v in directory.committed() for fb in directory.manifest(v).feedback
                }
                return wanted <= done

            wait_until(trained, 600, "every feedback trained")
            seconds = time.perf_counter() - started
        infos = [store.get_version(v) for v in store.version_numbers()]
        reused = sum(int(i.training.get("reused", 0)) for i in infos if i is not None)
        recomputed = sum(int(i.training.get("recomputed", 0)) for i in infos if i is not None)
        tokens = sum(
            len(r.response_tokens) for r in (store.get_request(rid) for rid in served) if r is not None
        )
        comm_share = None
        if dp:
            shares = []
            for url in urls:
                state = httpx.get(url + "/v1/versions", timeout=5).json()["worker"]["data_parallel"]
                if state["round_s"] > 0:
                    shares.append(state["comm_s"] / state["round_s"])
            comm_share = statistics.mean(shares) if shares else None
        return Row(
            config=config,
            samples=len(served),
            tokens=tokens,
            seconds=seconds,
            versions=len(infos),
            comm_share=comm_share,
            reuse=reused / max(1, reused + recomputed),
            idle_p50=percentile(idle.latencies, 50),
            idle_p99=percentile(idle.latencies, 99),
            busy_p50=percentile(busy.latencies, 50),
            busy_p99=percentile(busy.latencies, 99),
        )
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        store.close()
        redis_server.stop()


def build_model(work: Path) -> Path:
    from tests.fixtures.checkpoints import build_checkpoint

    return build_checkpoint(
        work / "model", "llama", hidden_size=256, num_layers=4, num_heads=4, intermediate_size=512
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default="dp1,dp2,dp3,lease3")
    parser.add_argument("--requests", type=int, default=16, help="requests served by each replica")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8, help="samples per member per round")
    parser.add_argument("--probe-seconds", type=float, default=5.0)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: a tiny random llama)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="alchemist-dp-bench-"))
    try:
        if args.model is None:
            args.model = build_model(work)
        rows = [run_config(args, config, work) for config in args.configs.split(",")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()}"
    )
    print(f"model: {args.model.name}, {args.requests} requests per replica, batch {args.batch} per member")
    print()
    print(
        "| config | samples | samples/s | tokens/s | versions | comm share | reuse | probe p50 idle / training | probe p99 idle / training |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = "-" if r.comm_share is None else f"{r.comm_share:.0%}"
        print(
            f"| {r.config} | {r.samples} | {r.samples / r.seconds:.2f} | {r.tokens / r.seconds:.1f} | {r.versions} "
            f"| {share} | {r.reuse:.0%} | {r.idle_p50 * 1000:.0f} / {r.busy_p50 * 1000:.0f} ms "
            f"| {r.idle_p99 * 1000:.0f} / {r.busy_p99 * 1000:.0f} ms |"
        )


if __name__ == "__main__":
    main()
