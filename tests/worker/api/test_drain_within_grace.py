"""A worker process configured as the operator configures a pod: SIGTERM in the middle of a long streamed answer.

The environment is the one the operator renders (the ConfigMap's data and the container's plain env values), so
`spec.lifecycle.drainSeconds` is what the worker honours: the answer completes when the drain allows it, and is
cut (finish_reason "abort") when it does not. Either way the process exits with status 0 before the pod's grace
period, minus the preStop sleep, runs out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
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


def stream_with_sigterm(pod: PodProcess) -> tuple[str | None, int, float, float]:
    """Streams a long answer, sends SIGTERM after its first tokens; returns (finish reason, chunks, seconds from
    SIGTERM to the last chunk, seconds from SIGTERM to the process's exit)."""
    client = openai.OpenAI(base_url=pod.url + "/v1", api_key="-", max_retries=0, timeout=120)
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
            pod.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
        finish = chunk.choices[0].finish_reason or finish
    last_chunk = time.monotonic() - signalled
    assert pod.process.wait(60) == 0
    return finish, chunks, last_chunk, time.monotonic() - signalled


@pytest.mark.slow
def test_a_long_stream_in_flight_at_sigterm_completes_within_the_grace_period(
    tiny_checkpoints: dict[str, Path], start_pod: Any
) -> None:
    env, grace, pre_stop = pod_environment(tiny_checkpoints["qwen2"], drain_seconds=60)
    assert env["ALCHEMIST_SHUTDOWN_TIMEOUT_S"] == "60" and grace == pre_stop + 60 + 15
    finish, chunks, last_chunk, exited = stream_with_sigterm(start_pod(env))
    assert finish == "length" and chunks >= MAX_TOKENS // 2  # every token (detokenized pieces may merge)
    assert exited < grace - pre_stop  # Kubernetes would not have killed it
    print(f"answer finished {last_chunk:.2f}s after SIGTERM, process exited after {exited:.2f}s")


@pytest.mark.slow
def test_the_drain_time_the_spec_gives_is_what_the_worker_allows(
    tiny_checkpoints: dict[str, Path], start_pod: Any
) -> None:
    env, grace, pre_stop = pod_environment(tiny_checkpoints["qwen2"], drain_seconds=0)
    assert env["ALCHEMIST_SHUTDOWN_TIMEOUT_S"] == "0"
    finish, chunks, _, exited = stream_with_sigterm(start_pod(env))
    assert finish == "abort" and chunks < MAX_TOKENS // 2  # cut at once, as the spec said
    assert exited < grace - pre_stop
