"""Fault injection at each step of a version commit, in a running worker (tiny model, real Redis).

Each test ends with the same proof: one linear lineage (every version's parent is the one before it, no two
directories for a number), no feedback id in two versions, every feedback id sent trained and nothing pending.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import FEEDBACK_GROUP
from alchemist_protocol.local_redis import LocalRedis
from alchemist_worker.continual.metrics import TrainingMetrics
from alchemist_worker.versions.directory import VersionDirectory
from alchemist_worker.versions.publisher import VersionDraft

from tests.worker.continual.conftest import KEYS, InProcessWorker, wait_until

PROMPTS = [[1, 5, 9, 13], [1, 7, 11], [1, 4, 8, 12, 16], [1, 6, 10, 14]]


def counter(metric: Any, **labels: str) -> float:
    total = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def send_feedback(worker: InProcessWorker, prompts: list[list[int]]) -> set[str]:
    """Serves each prompt and accepts its answer; returns the feedback ids (idempotency keys)."""
    ids = set()
    for prompt in prompts:
        out = worker.generate(prompt)
        worker.feedback.accept(
            out.request_id, idempotency_key=f"fb-{worker.runtime.settings.replica}-{out.request_id}"
        )
        ids.add(f"fb-{worker.runtime.settings.replica}-{out.request_id}")
    return ids


def check_lineage(directory: VersionDirectory, store: JobStore, client: redis.Redis, sent: set[str]) -> None:
    versions = directory.committed()
    assert versions == list(range(1, len(versions) + 1)), f"not one chain on disk: {versions}"
    assert store.version_numbers() == versions
    assert not [p.name for p in directory.root.iterdir() if p.name.startswith(".")], "leftovers"
    seen: dict[str, int] = {}
    for version in versions:
        manifest = directory.manifest(version)
        info = store.get_version(version)
        assert info is not None and info.parent == version - 1, f"version {version}: parent {info}"
        for fb in manifest.feedback:
            assert fb.feedback_id not in seen, (
                f"{fb.feedback_id} in versions {seen[fb.feedback_id]}, {version}"
            )
            seen[fb.feedback_id] = version
    assert set(seen) == sent
    assert trained_ids(client) == sent
    assert int(client.xpending(KEYS.feedback, FEEDBACK_GROUP)["pending"]) == 0


def trained_ids(client: redis.Redis) -> set[str]:
    """The trained feedback ids (a sorted set by training time; a plain set in older layouts)."""
    if client.type(KEYS.trained_feedback) == "zset":
        return set(client.zrange(KEYS.trained_feedback, 0, -1))
    return set(client.smembers(KEYS.trained_feedback))


def all_trained(client: redis.Redis, sent: set[str]) -> Callable[[], bool]:
    def done() -> bool:
        try:
            trained = trained_ids(client)
            return trained == sent and not int(client.xpending(KEYS.feedback, FEEDBACK_GROUP)["pending"])
        except redis.ConnectionError:  # down on purpose for a moment
            return False

    return done


def test_redis_stopping_right_after_the_directory_write_recommits_the_same_version(
    make_worker: Callable[..., InProcessWorker],
    redis_server: LocalRedis,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = make_worker(min_batch_samples=2, max_wait_s=30.0)
    control = worker.runtime.control
    real_publish = control.publisher.publish
    attempts: list[tuple[int, str]] = []

    def stop_redis() -> None:  # keeps its data (SHUTDOWN SAVE); back a second later
        with contextlib.suppress(redis.RedisError):
            redis.Redis.from_url(redis_server.url).shutdown(save=True)
        assert redis_server.process is not None
        redis_server.process.wait(10)

        def restart() -> None:
            time.sleep(1.0)
            redis_server.start()
            (redis_server.workdir / "dump.rdb").unlink(missing_ok=True)  # later restarts start empty again

        threading.Thread(target=restart, daemon=True).start()

    def publish(draft: VersionDraft, fence: str | None = None, after_files: Any = None) -> Any:
        attempts.append((draft.version, draft.writer))
        return real_publish(draft, fence, stop_redis if len(attempts) == 1 else after_files)

    monkeypatch.setattr(control.publisher, "publish", publish)
    sent = send_feedback(worker, PROMPTS[:2])
    # No more feedback arrives: the retry comes from the timer alone.
    wait_until(all_trained(redis_client, sent), 30, "the failed commit retried and completed")
    assert {a for a in attempts} == {attempts[0]} and len(attempts) >= 2  # the same draft, again
    assert counter(worker.runtime.metrics.commit_failures, **{"class": "redis"}) >= 1
    assert (
        control.commit_health.last_error is not None and control.commit_health.last_error["class"] == "redis"
    )
    assert control.status()["commit"]["unresolved_error"] == ""
    assert counter(worker.runtime.metrics.steps) == 1  # one step, counted once it was committed

    sent |= send_feedback(worker, PROMPTS[2:])
    wait_until(all_trained(redis_client, sent), 30, "the next version")
    check_lineage(worker.runtime.directory, worker.store, redis_client, sent)


@pytest.mark.slow  # r1 claims what r0 left pending on its next claim round, 5 s later
def test_a_holder_whose_lease_is_taken_over_between_step_and_commit_cannot_publish(
    make_worker: Callable[..., InProcessWorker],
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = make_worker(min_batch_samples=2, max_wait_s=30.0)
    wait_until(lambda: old.runtime.control.training, 10, "r0 training")
    new = make_worker(replica="r1", claim_idle_ms=200, min_batch_samples=2, max_wait_s=0.2)
    control = old.runtime.control
    real_publish = control.publisher.publish
    epochs: list[int | None] = []

    def paused_then_publish(draft: VersionDraft, fence: str | None = None, after_files: Any = None) -> Any:
        # r0 stalls here, between its step and its commit, past its lease; r1 takes the lease over.
        epochs.append(control.lease.epoch)
        redis_client.delete(KEYS.trainer_lease)
        wait_until(lambda: new.runtime.control.training, 10, "r1 took over")
        return real_publish(draft, fence, after_files)

    monkeypatch.setattr(control.publisher, "publish", paused_then_publish)
    sent = send_feedback(old, PROMPTS[:2])
    wait_until(
        lambda: counter(old.runtime.metrics.commit_failures, **{"class": "conflict"}) == 1, 20, "fenced"
    )
    assert new.runtime.control.lease.epoch == (epochs[0] or 0) + 1
    # r0 published nothing (r1 may already have published what it claimed from r0: every version is r1's)
    published = [old.store.get_version(v) for v in old.store.version_numbers()]
    assert all(info is not None and info.trained_by == "r1" for info in published)
    assert counter(old.runtime.metrics.steps) == 0 and counter(old.runtime.metrics.versions_published) == 0
    # The failure is counted first, then training stops (same control-thread call): wait for the second.
    wait_until(lambda: not control.training, 10, "r0 stopped training")
    # r1 claims what r0 left pending and trains it.
    wait_until(all_trained(redis_client, sent), 30, "r1 trained r0's feedback")
    info = old.store.get_version(1)
    assert info is not None and info.trained_by == "r1"
    check_lineage(old.runtime.directory, old.store, redis_client, sent)


def test_an_unwritable_versions_directory_is_an_io_error_retried_until_it_heals(
    make_worker: Callable[..., InProcessWorker],
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    worker = make_worker(min_batch_samples=2, max_wait_s=30.0)
    root = worker.runtime.directory.root
    real_rename = os.rename
    broken = threading.Event()
    broken.set()

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if broken.is_set() and Path(dst).parent == root and Path(dst).name.startswith("v"):
            raise PermissionError(errno.EACCES, "Permission denied", str(dst))
        real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    sent = send_feedback(worker, PROMPTS[:2])
    metrics: TrainingMetrics = worker.runtime.metrics
    wait_until(lambda: counter(metrics.commit_failures, **{"class": "io"}) >= 2, 20, "retried I/O failures")
    status = worker.runtime.control.status()["commit"]
    assert status["state"] == "retrying" and status["failures"]["conflict"] == 0
    assert status["unresolved_error"].startswith("io: ") and "Permission denied" in status["unresolved_error"]
    wait_until(lambda: worker.store.live_replicas()[0].commit_error.startswith("io: "), 5, "in the heartbeat")
    assert worker.runtime.control.training  # not mistaken for another trainer
    assert counter(metrics.steps) == 0 and worker.store.version_numbers() == []
    assert not [p for p in root.iterdir() if p.name.startswith(".staging-")]  # removed after each attempt
    assert int(redis_client.xpending(KEYS.feedback, FEEDBACK_GROUP)["pending"]) == 2  # held, not acknowledged

    broken.clear()
    wait_until(all_trained(redis_client, sent), 30, "committed once the directory is writable")
    assert worker.runtime.control.status()["commit"]["unresolved_error"] == ""
    wait_until(lambda: worker.store.live_replicas()[0].commit_error == "", 5, "the heartbeat cleared")
    assert counter(metrics.steps) == 1
    check_lineage(worker.runtime.directory, worker.store, redis_client, sent)
