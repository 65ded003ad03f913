"""A worker process configured as the operator configures a pod: SIGTERM in the middle of a long streamed answer.

The environment is the one the operator renders (the ConfigMap's data and the container's plain env values), so
`spec.lifecycle.drainSeconds` is what the worker honours: the answer completes when the drain allows it (a real
process, a real SIGTERM, exit status 0), and is cut (finish_reason "abort") when it does not. Either way the worker
exits before the pod's grace period, minus the preStop sleep, runs out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from alchemist_operator.children import desired_children
from alchemist_operator.naming import JobRef
from alchemist_operator.operator_config import OperatorConfig
from alchemist_operator.spec_checks import validate_job
from alchemist_protocol.local_redis import free_port

from tests.worker.api.conftest import start_worker


@dataclass(frozen=True)
class Drained:
    finish: str | None
    chunks: int
    last_chunk_after: float  # seconds from SIGTERM to the last chunk
    exited_after: float  # seconds from SIGTERM to the worker's exit


CONFIG = OperatorConfig(worker_image="alchemist/worker:test", default_redis_url="redis://unused:6379/0")
JOB = JobRef(namespace="team-a", name="chat", uid="1")
MAX_TOKENS = 400


def pod_environment(checkpoint: Path, drain_seconds: int) -> tuple[dict[str, str], int, int]:
    """(environment, grace period, preStop sleep) of the pod the operator builds for such a job."""
    spec = validate_job(
        "chat",
        {
            "model": {"path": str(checkpoint), "dtype": "float32"},
            "resources": {"gpus": 0, "cpu": "2", "memory": "4Gi"},
            "serving": {"maxModelLen": 512, "kvCacheMemory": "32Mi", "maxNumSeqs": 4},
            "recording": {"policy": "off", "hostMemory": "1Gi"},
            "lifecycle": {"drainSeconds": drain_seconds},
        },
        CONFIG,
    )
    children = {m["kind"]: m for m in desired_children(JOB, spec, CONFIG)}
    pod: dict[str, Any] = children["StatefulSet"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = dict(children["ConfigMap"]["data"])
    env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})
    env.pop("ALCHEMIST_REDIS_URL", None)  # serving alone: no trainer, no Redis
    env.update({"ALCHEMIST_HOST": "127.0.0.1", "ALCHEMIST_PORT": str(free_port())})
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    return env, int(pod["terminationGracePeriodSeconds"]), pre_stop


class PodProcess:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.url = f"http://127.0.0.1:{env['ALCHEMIST_PORT']}"
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "alchemist_worker.cli", "serve"],
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the worker exited with {self.process.returncode}: {log.read_text()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not become ready: {log.read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def start_pod(tmp_path: Path) -> Iterator[Any]:
    started: list[PodProcess] = []

    def start(env: dict[str, str]) -> PodProcess:
        pod = PodProcess(env, tmp_path / f"worker-{len(started)}.log")
        started.append(pod)
        return pod

    yield start
    for pod in started:
        pod.stop()


def stream_with_sigterm(url: str, sigterm: Callable[[], None], wait_exit: Callable[[], None]) -> Drained:
    """Streams a long answer and calls `sigterm` after its first tokens; then waits for the worker to exit."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120)
    stream = client.completions.create(
        model="chat",
        prompt="tell me a long story",
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    finish: str | None = None
    chunks = 0
    signalled = 0.0
    for chunk in stream:
        chunks += 1
        if chunks == 5:
            sigterm()
            signalled = time.monotonic()
        finish = chunk.choices[0].finish_reason or finish
    last_chunk = time.monotonic() - signalled
    wait_exit()
    return Drained(finish, chunks, last_chunk, time.monotonic() - signalled)


@pytest.mark.slow
def test_a_long_stream_in_flight_at_sigterm_completes_within_the_grace_period(
    tiny_checkpoints: dict[str, Path], start_pod: Any
) -> None:
    env, grace, pre_stop = pod_environment(tiny_checkpoints["qwen2"], drain_seconds=60)
    assert env["ALCHEMIST_SHUTDOWN_TIMEOUT_S"] == "60" and grace == pre_stop + 60 + 15
    pod = start_pod(env)

    def exited_cleanly() -> None:
        assert pod.process.wait(60) == 0

    drained = stream_with_sigterm(pod.url, lambda: pod.process.send_signal(signal.SIGTERM), exited_cleanly)
    assert drained.finish == "length" and drained.chunks >= MAX_TOKENS // 2  # every token (pieces may merge)
    assert drained.exited_after < grace - pre_stop  # Kubernetes would not have killed it
    print(
        f"answer finished {drained.last_chunk_after:.2f}s after SIGTERM, exit after {drained.exited_after:.2f}s"
    )


@pytest.mark.slow
def test_the_drain_time_the_spec_gives_is_what_the_worker_allows(tiny_checkpoints: dict[str, Path]) -> None:
    """In this process (one worker process is enough to show the signal path): settings resolved from the
    rendered environment, and the server's own SIGTERM handler."""
    env, grace, pre_stop = pod_environment(tiny_checkpoints["qwen2"], drain_seconds=0)
    assert env["ALCHEMIST_SHUTDOWN_TIMEOUT_S"] == "0"
    del env["ALCHEMIST_CPU_THREADS"]  # torch's threads are process-wide: not for the test process
    running = start_worker(tiny_checkpoints["qwen2"], env=env)  # its flags (model, port, device) win
    assert running.worker.settings.shutdown_timeout_s == 0

    def stopped() -> None:
        running.thread.join(60)
        assert not running.thread.is_alive()

    drained = stream_with_sigterm(
        running.base_url, lambda: running.worker.server.handle_exit(signal.SIGTERM, None), stopped
    )
    assert drained.finish == "abort" and drained.chunks < MAX_TOKENS // 2  # cut at once, as the spec said
    assert drained.exited_after < grace - pre_stop
