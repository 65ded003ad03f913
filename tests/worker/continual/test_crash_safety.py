"""Crash safety with real processes and the real Redis: kill -9 at random moments, and a Redis restart.

Invariants: no feedback is lost (every id ends up trained, every entry acknowledged), none is trained twice
(each feedback id is in exactly one committed version), no version is ever half-written (every version
directory is complete and loads), and after each restart training resumes from the last committed version
(the versions form one chain, each the parent of the next, their optimizer steps increasing).
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
from alchemist_protocol.feedback_client import FeedbackClient
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import FEEDBACK_GROUP, JobKeys
from alchemist_protocol.local_redis import LocalRedis
from alchemist_protocol.schemas import RequestRecord
from alchemist_worker.versions.artifacts import read_lora_adapter, read_trainer_state
from alchemist_worker.versions.directory import VersionDirectory

from tests.worker.continual.conftest import wait_until
from tests.worker.continual.worker_process import WorkerProcess

KEYS = JobKeys("ns", "job")
pytestmark = pytest.mark.slow


def seed_requests(store: JobStore, count: int) -> list[str]:
    """Requests another replica served: this worker trains them by recomputation from their tokens."""
    rng = random.Random(0)
    ids = []
    for n in range(count):
        prompt = [1] + [rng.randrange(3, 500) for _ in range(rng.randrange(4, 20))]
        response = [rng.randrange(3, 500) for _ in range(rng.randrange(2, 10))]
        store.put_request(
            RequestRecord(
                request_id=f"old-{n}",
                prompt_tokens=prompt,
                response_tokens=response,
                replica="gone",
                version=0,
                model="m",
            ),
            ttl_seconds=3600,
        )
        ids.append(f"old-{n}")
    return ids


def check_versions(directory: VersionDirectory, store: JobStore, sent: set[str]) -> None:
    versions = directory.committed()
    assert versions == list(range(1, len(versions) + 1)), f"versions are not one chain: {versions}"
    assert store.version_numbers() == versions
    seen: dict[str, int] = {}
    last_steps = 0
    for version in versions:
        manifest = directory.manifest(version)
        assert manifest.info.parent == version - 1, f"version {version} does not descend from {version - 1}"
        for name in manifest.files:
            assert (directory.path(version) / name).stat().st_size > 0
        read_lora_adapter(directory.path(version))  # loads: no half-written file
        state = read_trainer_state(directory.path(version))
        assert state is not None and state["head_version"] == version
        steps = manifest.info.training["steps"]
        assert steps[0] > last_steps, (
            f"version {version} restarted its optimizer steps ({steps} after {last_steps})"
        )
        last_steps = steps[-1]
        for fb in manifest.feedback:
            assert fb.feedback_id not in seen, (
                f"{fb.feedback_id} trained in versions {seen[fb.feedback_id]} and {version}"
            )
            seen[fb.feedback_id] = version
    assert set(seen) == sent, (
        f"lost: {sorted(sent - set(seen))[:5]}, unexpected: {sorted(set(seen) - sent)[:5]}"
    )


def kill_at(worker: WorkerProcess, directory: VersionDirectory, moment: str, rng: random.Random) -> None:
    if moment == "random":
        time.sleep(rng.uniform(0.3, 2.0))
        worker.kill()
        return
    known = set(directory.committed())
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        names = [p.name for p in directory.root.iterdir()]
        if moment == "staging" and any(n.startswith(".staging-") for n in names):
            break
        if moment == "committed" and set(directory.committed()) - known:
            break
    worker.kill()


def test_kill_9_repeatedly_loses_nothing_and_never_half_writes(
    tiny_checkpoints: dict[str, Path], redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    store = JobStore(redis_client, KEYS)
    requests = seed_requests(store, 30)
    client = FeedbackClient(redis_client, KEYS)
    sent: set[str] = set()
    stop = threading.Event()

    def applications() -> None:  # feedback keeps coming, retries included, whatever the worker does
        rng = random.Random(1)
        n = 0
        first: list[str] = []  # the request each key was sent for
        while not stop.is_set() and n < 80:
            key = f"fb-{n}"
            first.append(rng.choice(requests))
            client.accept(first[n], idempotency_key=key)
            sent.add(key)
            if rng.random() < 0.2:  # an application retry of an earlier one: the same feedback again
                earlier = rng.randrange(n + 1)
                client.accept(first[earlier], idempotency_key=f"fb-{earlier}")
            n += 1
            time.sleep(0.3)  # spread over the worker's lives, so each has commits to be killed in

    sender = threading.Thread(target=applications, daemon=True)
    sender.start()
    directory = VersionDirectory(tmp_path / "versions")
    worker = WorkerProcess(
        tiny_checkpoints["llama"], redis_url, directory.root, tmp_path / "worker.log",
        ALCHEMIST_TRAINING_BATCH_SIZE="3",
    )  # fmt: skip
    rng = random.Random(2)
    kills = 0
    # Lives end at a random moment, or the instant a version is being written (a staging directory exists)
    # or has just been committed (before Redis heard of it), as seen by polling the directory from outside.
    for moment in ("random", "staging", "committed", "staging", "committed"):
        worker.start()
        kill_at(worker, directory, moment, rng)
        kills += 1
    sender.join(30)
    stop.set()
    worker.start()  # the last life: drains everything
    try:
        wait_until(
            lambda: (
                int(redis_client.xpending(KEYS.feedback, FEEDBACK_GROUP)["pending"]) == 0
                and redis_client.zcard(KEYS.trained_feedback) == len(sent)
            ),
            timeout=120,
            what="all feedback trained and acknowledged",
        )
        assert worker.status()["training"] is True
    finally:
        worker.stop()
    assert kills == 5 and len(directory.committed()) > 1
    assert not [p.name for p in directory.root.iterdir() if p.name.startswith(".")]  # leftovers cleaned
    check_versions(directory, store, sent)


def test_redis_restart_while_the_worker_runs(
    tiny_checkpoints: dict[str, Path], redis_server: LocalRedis, redis_url: str, tmp_path: Path
) -> None:
    directory = VersionDirectory(tmp_path / "versions")
    worker = WorkerProcess(
        tiny_checkpoints["llama"], redis_url, directory.root, tmp_path / "worker.log"
    ).start()
    http = httpx.Client(base_url=worker.base_url, timeout=30)

    def served() -> str:
        body = {"model": tiny_checkpoints["llama"].name, "prompt": "hello there", "max_tokens": 4}
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return str(response.json()["id"])

    def feedback(response_id: str) -> int:
        return http.post("/v1/feedback", json={"response_id": response_id, "label": "accept"}).status_code

    store = JobStore(redis.Redis.from_url(redis_url, decode_responses=True), KEYS)
    try:
        first = served()
        wait_until(lambda: store.get_request(first) is not None, 10, "the request record")
        assert feedback(first) == 202
        wait_until(lambda: store.latest_version() == 1, 60, "version 1")

        redis_server.kill()
        assert served()  # serving does not need Redis
        assert feedback(first) == 503  # the feedback queue is down, and the application is told so
        redis_server.start()  # empty: Redis keeps nothing on disk here

        # The worker notices, recreates its consumer group and rebuilds the versions index from disk.
        wait_until(lambda: store.version_numbers() == [1], 30, "versions rebuilt in Redis")
        wait_until(lambda: [r.loaded_version for r in store.live_replicas()] == [1], 30, "the heartbeat back")
        second = served()
        wait_until(lambda: store.get_request(second) is not None, 10, "a new request record")
        assert feedback(second) == 202
        wait_until(lambda: store.latest_version() == 2, 60, "version 2 after the restart")
        info = store.get_version(2)
        assert info is not None and info.parent == 1
    finally:
        http.close()
        worker.stop()
