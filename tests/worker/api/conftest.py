"""A real worker (engine, loop, uvicorn) on a free port, serving a tiny checkpoint from a background thread."""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from alchemist_protocol.local_redis import free_port
from alchemist_worker.api.serve import Worker, build_worker
from alchemist_worker.api.serve_settings import add_serve_arguments, resolve_settings
from openai import OpenAI


@dataclass
class RunningWorker:
    worker: Worker
    thread: threading.Thread
    base_url: str

    @property
    def model(self) -> str:
        return self.worker.engine.model_name

    def client(self, **kwargs: Any) -> OpenAI:
        return OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, **kwargs)

    def stop(self, timeout: float = 30.0) -> None:
        self.worker.server.should_exit = True
        self.thread.join(timeout)


def start_worker(model: Path, *flags: str, env: dict[str, str] | None = None) -> RunningWorker:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    port = free_port()
    args = parser.parse_args(
        ["--model", str(model), "--port", str(port), "--dtype", "float32", "--device", "cpu", *flags]
    )
    settings = resolve_settings(args, env or {})
    worker = build_worker(settings)
    thread = threading.Thread(target=worker.run, name="test-worker", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not worker.server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the worker did not start")
        time.sleep(0.02)
    return RunningWorker(worker, thread, f"http://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def tiny_server(tiny_checkpoints: dict[str, Path]) -> Iterator[RunningWorker]:
    running = start_worker(
        tiny_checkpoints["llama"],
        "--served-model-name",
        "tiny",
        "--max-model-len",
        "128",
        "--kv-cache-mib",
        "8",
    )
    yield running
    running.stop()
