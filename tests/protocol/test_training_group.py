"""The training group's record in the real Redis: only the lease holder forms generations; offers expire."""

from __future__ import annotations

import time

import redis
from alchemist_protocol.keys import JobKeys
from alchemist_protocol.training_group import GroupRecord, MemberOffer, TrainingGroupStore

KEYS = JobKeys("ns", "job")


def record(*members: str) -> GroupRecord:
    return GroupRecord(
        generation=0, members=list(members), master_addr="r0.job", master_port=29500, restore_version=3
    )


def test_only_the_lease_holder_forms_a_generation(redis_client: redis.Redis) -> None:
    group = TrainingGroupStore(redis_client, KEYS)
    assert group.read() is None
    redis_client.set(KEYS.trainer_lease, "r0/1/abc")
    first = group.form(record("r0", "r1"), "r0/1/abc")
    assert first is not None and first.generation == 1 and first.leader_token == "r0/1/abc"
    assert group.read() == first
    assert group.form(record("r1"), "r1/0/old") is None  # a stale token: nothing written
    assert group.read() == first
    second = group.form(record("r0", "r1", "r2"), "r0/1/abc")
    assert second is not None and second.generation == 2 and second.rank_of("r2") == 2
    redis_client.delete(KEYS.training_group)  # the counter survives the record: generations never repeat
    third = group.form(record("r0"), "r0/1/abc")
    assert third is not None and third.generation == 3


def test_offers_expire_when_not_renewed(redis_client: redis.Redis) -> None:
    group = TrainingGroupStore(redis_client, KEYS)
    group.offer(MemberOffer(replica="r1", generation=4, waiting=False), ttl_s=0.2)
    group.offer(MemberOffer(replica="r0"), ttl_s=30)
    assert [(o.replica, o.generation, o.waiting) for o in group.offers()] == [
        ("r0", 0, True),
        ("r1", 4, False),
    ]
    time.sleep(0.3)
    assert [o.replica for o in group.offers()] == ["r0"]
