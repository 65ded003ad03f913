"""A real worker with Redis (feedback, versions, score routes) for the auth and conformance tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from alchemist_protocol.local_redis import LocalRedis

from tests.worker.api.conftest import RunningWorker, start_worker


@contextmanager
def worker_with_redis(
    checkpoint: Path, redis_server: LocalRedis, job: str, env: dict[str, str]
) -> Iterator[RunningWorker]:
    """`env` is set in os.environ while the worker is built (keys, runtime and trainer settings read it)."""
    redis_server.start()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        running = start_worker(
            checkpoint,
            "--served-model-name",
            "tiny",
            "--max-model-len",
            "128",
            "--kv-cache-mib",
            "8",
            "--redis-url",
            redis_server.url,
            "--job",
            job,
            "--replica",
            "r0",
        )
    try:
        yield running
    finally:
        running.stop()
