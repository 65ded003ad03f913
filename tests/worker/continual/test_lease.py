import time

import redis
from alchemist_protocol.job_store import JobStore, VersionCommit
from alchemist_protocol.keys import JobKeys
from alchemist_protocol.schemas import ArtifactKind, VersionInfo
from alchemist_worker.continual.lease import TrainerLease

KEYS = JobKeys("ns", "job")


def test_one_holder_at_a_time_and_takeover_after_expiry(redis_client: redis.Redis) -> None:
    a = TrainerLease(redis_client, KEYS, "r0", ttl_s=0.3)
    b = TrainerLease(redis_client, KEYS, "r1", ttl_s=0.3)
    assert a.acquire_or_renew() and not b.acquire_or_renew()
    assert a.acquire_or_renew() and b.current_holder() == "r0"
    time.sleep(0.4)  # r0 died without releasing
    assert b.acquire_or_renew() and not a.acquire_or_renew()
    b.release()
    assert b.current_holder() is None and a.acquire_or_renew()


def test_release_by_a_non_holder_does_nothing(redis_client: redis.Redis) -> None:
    a = TrainerLease(redis_client, KEYS, "r0")
    b = TrainerLease(redis_client, KEYS, "r1")
    a.acquire_or_renew()
    b.release()
    assert a.current_holder() == "r0"


def test_every_acquisition_mints_a_new_token_with_a_higher_epoch(redis_client: redis.Redis) -> None:
    a = TrainerLease(redis_client, KEYS, "r0", ttl_s=0.3)
    b = TrainerLease(redis_client, KEYS, "r1", ttl_s=0.3)
    assert a.acquire_or_renew() and a.epoch == 1
    first = a.token
    assert a.acquire_or_renew() and a.token == first  # a renewal keeps the token
    time.sleep(0.4)  # r0 paused past its TTL; r1 takes over
    assert b.acquire_or_renew() and b.epoch == 2
    assert not a.acquire_or_renew() and a.token is None
    b.release()
    assert a.acquire_or_renew() and a.epoch == 3 and a.token != first  # back, but under a new token


def test_the_commit_refuses_a_stale_token_and_a_moved_head(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client, KEYS)
    old = TrainerLease(redis_client, KEYS, "r0", ttl_s=0.2)
    new = TrainerLease(redis_client, KEYS, "r1", ttl_s=5)
    assert old.acquire_or_renew()
    stale = old.token
    time.sleep(0.3)
    assert new.acquire_or_renew()

    def info(version: int) -> VersionInfo:
        return VersionInfo(version=version, parent=version - 1, kind=ArtifactKind.LORA, path=f"/v/{version}")

    assert store.commit_version(info(1), stale, expected_head=0) is VersionCommit.FENCED
    assert store.version_numbers() == []
    first = info(1)
    assert store.commit_version(first, new.token, expected_head=0) is VersionCommit.COMMITTED
    assert store.commit_version(first, new.token, expected_head=0) is VersionCommit.COMMITTED  # a lost reply
    assert store.commit_version(info(2), new.token, expected_head=0) is VersionCommit.MOVED
    assert store.commit_version(info(1), new.token, expected_head=0) is VersionCommit.TAKEN
    assert store.version_numbers() == [1] and redis_client.xlen(KEYS.version_events) == 1
