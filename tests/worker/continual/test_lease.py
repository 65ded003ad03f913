import time

import redis
from alchemist_protocol.keys import JobKeys
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
