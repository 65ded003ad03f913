import errno
import os
from pathlib import Path

import pytest
import redis
from alchemist_protocol.feedback_client import FeedbackClient
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import FEEDBACK_GROUP, JobKeys
from alchemist_protocol.schemas import ArtifactKind, ReplicaState, RolloutPointer, VersionInfo
from alchemist_worker.continual.lease import TrainerLease
from alchemist_worker.feedback.consumer import ConsumerSettings, FeedbackConsumer, SettledFeedback
from alchemist_worker.versions.directory import VersionDirectory, VersionManifest
from alchemist_worker.versions.publisher import (
    CommitConflict,
    CommitIOError,
    RedisUnavailable,
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


def test_a_rename_refused_by_the_disk_is_an_io_error_not_a_conflict(
    redis_client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = JobStore(redis_client, KEYS)
    pub = VersionPublisher(VersionDirectory(tmp_path), store, "r0", keep=3)
    feedback = read_feedback(redis_client, 2)
    real_rename = os.rename

    def refused(src: object, dst: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(dst))

    monkeypatch.setattr(os, "rename", refused)
    attempt = draft(1, feedback)
    with pytest.raises(CommitIOError, match="Permission denied"):
        pub.commit(attempt)
    assert os.listdir(tmp_path) == [] and store.version_numbers() == [] and pending(redis_client) == 2
    monkeypatch.setattr(os, "rename", real_rename)
    pub.commit(attempt)  # the same draft, once the disk heals
    assert store.version_numbers() == [1] and pending(redis_client) == 0


def test_a_full_disk_while_writing_is_an_io_error_and_leaves_no_staging(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    pub = VersionPublisher(VersionDirectory(tmp_path), JobStore(redis_client, KEYS), "r0", keep=3)

    def full(path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CommitIOError, match="No space"):
        pub.commit(VersionDraft(1, 0, ArtifactKind.LORA, full, []))
    assert os.listdir(tmp_path) == []


def test_redis_down_after_the_directory_write_then_the_same_draft_recommits_its_directory(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    store = JobStore(redis_client, KEYS)
    directory = VersionDirectory(tmp_path)
    pub = VersionPublisher(directory, store, "r0", keep=3)
    attempt = draft(1, read_feedback(redis_client, 2))

    def redis_down() -> None:
        raise redis.ConnectionError("Connection refused")

    with pytest.raises(RedisUnavailable):
        pub.commit(attempt, after_files=redis_down)
    written = directory.manifest(1)
    assert written.writer == attempt.writer and store.version_numbers() == [] and pending(redis_client) == 2
    info = pub.commit(attempt)
    assert info == written.info and directory.committed() == [1]  # reused, not written again
    assert store.version_numbers() == [1] and pending(redis_client) == 0


def test_a_holder_fenced_out_after_its_rename_cannot_publish_and_the_new_holder_adopts(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    store = JobStore(redis_client, KEYS)
    directory = VersionDirectory(tmp_path)
    old = TrainerLease(redis_client, KEYS, "r0")
    new = TrainerLease(redis_client, KEYS, "r1")
    assert old.acquire_or_renew()
    attempt = draft(1, read_feedback(redis_client, 2))

    def taken_over() -> None:  # r0 paused right after its rename; its lease expired and r1 took it
        redis_client.delete(KEYS.trainer_lease)
        assert new.acquire_or_renew()

    with pytest.raises(CommitConflict, match="fenced"):
        VersionPublisher(directory, store, "r0", keep=3).commit(attempt, old.token, after_files=taken_over)
    assert store.version_numbers() == [] and pending(redis_client) == 2  # not published, not acknowledged
    report = VersionPublisher(directory, store, "r1", keep=3).reconcile(new.token)
    assert report.republished == [1] and store.version_numbers() == [1] and pending(redis_client) == 0


def test_a_fenced_out_holder_stops_before_its_rename(redis_client: redis.Redis, tmp_path: Path) -> None:
    store = JobStore(redis_client, KEYS)
    stale = TrainerLease(redis_client, KEYS, "r0", ttl_s=0.1)
    assert stale.acquire_or_renew()
    token = stale.token
    redis_client.delete(KEYS.trainer_lease)
    assert TrainerLease(redis_client, KEYS, "r1").acquire_or_renew()
    with pytest.raises(CommitConflict, match="taken over"):
        VersionPublisher(VersionDirectory(tmp_path), store, "r0", keep=3).commit(draft(1, []), token)
    assert os.listdir(tmp_path) == []  # the staging directory is gone, no version directory was made


def test_reconcile_discards_a_sibling_and_keeps_the_lineage(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    store = JobStore(redis_client, KEYS)
    directory = VersionDirectory(tmp_path)
    pub = VersionPublisher(directory, store, "r0", keep=10)
    pub.commit(draft(1, []))
    pub.commit(draft(2, []))
    orphan = draft(4, [])  # built on a head (3) that never was: refused, and withdrawn by its own writer
    orphan.expected_head = 3
    with pytest.raises(CommitConflict, match="moved"):
        pub.commit(orphan)
    assert directory.committed() == [1, 2]
    staged = directory.stage(4)  # the same left behind by a writer that died: reconcile discards it
    (staged.path / "adapter_model.safetensors").write_bytes(b"w")
    manifest = VersionManifest(info=VersionInfo(version=4, parent=3, kind=ArtifactKind.LORA, path=""))
    directory.commit(staged, manifest)
    report = pub.reconcile()
    assert report.discarded == [4] and directory.committed() == [1, 2] and store.version_numbers() == [1, 2]
