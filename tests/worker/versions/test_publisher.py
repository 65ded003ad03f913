from pathlib import Path

import pytest
import redis
from alchemist_protocol.feedback_client import FeedbackClient
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import FEEDBACK_GROUP, JobKeys
from alchemist_protocol.schemas import ArtifactKind, ReplicaState, RolloutPointer
from alchemist_worker.feedback.consumer import ConsumerSettings, FeedbackConsumer, SettledFeedback
from alchemist_worker.versions.directory import VersionDirectory
from alchemist_worker.versions.publisher import (
    CommitConflict,
    VersionDraft,
    VersionPublisher,
    entry_ranges,
)

KEYS = JobKeys("ns", "job")


class Died(Exception):
    pass


def draft(version: int, feedback: list[SettledFeedback]) -> VersionDraft:
    return VersionDraft(
        version=version,
        parent=version - 1,
        kind=ArtifactKind.LORA,
        write_files=lambda path: (path / "adapter_model.safetensors").write_bytes(b"w"),
        feedback=feedback,
        loss=1.5,
        samples=len(feedback),
        feedback_ranges=entry_ranges([e for f in feedback for e in f.entry_ids]),
    )


def read_feedback(redis_client: redis.Redis, n: int) -> list[SettledFeedback]:
    client = FeedbackClient(redis_client, KEYS)
    for i in range(n):
        client.accept(f"cmpl-{i}")
    consumer = FeedbackConsumer(redis_client, KEYS, ConsumerSettings("r0"))
    consumer.ensure_group()
    return [SettledFeedback(i.feedback_id, i.entry_ids, "positive", 0) for i in consumer.poll()]


def pending(redis_client: redis.Redis) -> int:
    return int(redis_client.xpending(KEYS.feedback, FEEDBACK_GROUP)["pending"])


def test_commit_publishes_and_acknowledges(redis_client: redis.Redis, tmp_path: Path) -> None:
    store = JobStore(redis_client, KEYS)
    pub = VersionPublisher(VersionDirectory(tmp_path), store, "r0", keep=3)
    feedback = read_feedback(redis_client, 2)
    info = pub.commit(draft(1, feedback))
    assert store.latest_version() == 1 and store.get_version(1) == info
    assert info.path == str(tmp_path / "v000001") and info.trained_by == "r0"
    assert info.feedback_ranges == [(feedback[0].entry_ids[0], feedback[1].entry_ids[0])]
    assert pending(redis_client) == 0
    assert redis_client.hget(KEYS.version_feedback(0), "positive") == "2"
    with pytest.raises(CommitConflict):  # the number is taken on disk
        pub.commit(draft(1, []))


def test_a_crash_after_the_commit_point_is_completed_by_reconcile(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    store = JobStore(redis_client, KEYS)
    pub = VersionPublisher(VersionDirectory(tmp_path), store, "r0", keep=3)
    feedback = read_feedback(redis_client, 2)

    def die() -> None:
        raise Died

    with pytest.raises(Died):
        pub.commit(draft(1, feedback), after_files=die)
    assert store.latest_version() == 0 and pending(redis_client) == 2  # on disk, unknown to Redis
    report = pub.reconcile()
    assert report.republished == [1] and report.refinalized == 2
    assert store.latest_version() == 1 and pending(redis_client) == 0
    assert pub.reconcile().republished == []  # idempotent


def test_redis_loss_is_repaired_from_the_directory(redis_client: redis.Redis, tmp_path: Path) -> None:
    store = JobStore(redis_client, KEYS)
    pub = VersionPublisher(VersionDirectory(tmp_path), store, "r0", keep=3)
    pub.commit(draft(1, read_feedback(redis_client, 1)))
    trained = set(redis_client.zrange(KEYS.trained_feedback, 0, -1))
    redis_client.flushall()
    pub.reconcile()
    assert (
        store.version_numbers() == [1] and set(redis_client.zrange(KEYS.trained_feedback, 0, -1)) == trained
    )


def test_prune_spares_served_and_pointed_versions(redis_client: redis.Redis, tmp_path: Path) -> None:
    store = JobStore(redis_client, KEYS)
    directory = VersionDirectory(tmp_path)
    pub = VersionPublisher(directory, store, "r0", keep=2)
    for v in range(1, 7):
        pub.commit(draft(v, []))
    store.report_replica(ReplicaState(replica="r1", loaded_version=2, ready=True), ttl_seconds=30)
    store.set_rollout(RolloutPointer(stable_version=3))
    assert pub.prune() == [1, 4]
    assert directory.committed() == [2, 3, 5, 6] and store.version_numbers() == [2, 3, 5, 6]
