"""Bounded retention: the feedback stream loses only acknowledged entries, trained ids are forgotten after the
horizon (and remembered within it)."""

from __future__ import annotations

import time

import redis
from alchemist_protocol.feedback_client import FeedbackClient
from alchemist_protocol.keys import FEEDBACK_GROUP, JobKeys
from alchemist_protocol.schemas import Feedback
from alchemist_worker.feedback.consumer import ConsumerSettings, FeedbackConsumer

KEYS = JobKeys("ns", "job")


def consumer(client: redis.Redis, **kw: int | float) -> FeedbackConsumer:
    c = FeedbackConsumer(client, KEYS, ConsumerSettings(consumer="r0", trim_every_s=0, **kw))  # type: ignore[arg-type]
    c.ensure_group()
    return c


def stream_ids(client: redis.Redis) -> list[str]:
    return [eid for eid, _ in client.xrange(KEYS.feedback)]


def pending_ids(client: redis.Redis) -> set[str]:
    return {p["message_id"] for p in client.xpending_range(KEYS.feedback, FEEDBACK_GROUP, "-", "+", 1000)}


def test_acknowledged_entries_are_trimmed_never_pending_or_undelivered_ones(
    redis_client: redis.Redis,
) -> None:
    fc = FeedbackClient(redis_client, KEYS)
    sent = [fc.accept(f"cmpl-{n}") for n in range(10)]
    c = consumer(redis_client, read_count=4)
    items = c.poll()  # 0..3 delivered, 4..9 undelivered
    c.finalize(items[1:3])  # 1 and 2 acknowledged, but 0 still pending: only what lies below 0 could go
    assert stream_ids(redis_client) == sent
    c.finalize(items[:1])
    assert stream_ids(redis_client) == sent[3:]  # all below the lowest pending (3) went
    c.finalize(items[3:])
    assert stream_ids(redis_client) == sent[4:]  # none pending: up to the last delivered one
    rest = c.poll() + c.poll()
    c.finalize(rest)
    assert stream_ids(redis_client) == [] and c.lag().entries == 0


def test_length_backstop_deletes_acknowledged_entries_above_an_old_pending_one(
    redis_client: redis.Redis,
) -> None:
    fc = FeedbackClient(redis_client, KEYS)
    sent = [fc.accept(f"cmpl-{n}") for n in range(12)]
    c = consumer(redis_client, read_count=8, stream_max_len=5)
    items = c.poll()  # 0..7 pending, 8..11 undelivered
    c.finalize(items[1:])  # 0 stays pending (a slow step, or a dead consumer's entry)
    kept = stream_ids(redis_client)
    # Unacknowledged entries are kept even beyond the bound: entry 0 and the four undelivered ones.
    assert kept == [sent[0], *sent[8:]] and pending_ids(redis_client) == {sent[0]}
    assert c.counters.trimmed == 7


def test_length_backstop_removes_only_the_excess(redis_client: redis.Redis) -> None:
    fc = FeedbackClient(redis_client, KEYS)
    sent = [fc.accept(f"cmpl-{n}") for n in range(10)]
    c = consumer(redis_client, read_count=10, stream_max_len=6)
    items = c.poll()
    c.finalize([items[0], items[2], items[3], items[5], items[6], items[7]])  # 1, 4, 8, 9 stay pending
    # Below 1 everything goes (entry 0); then the oldest acknowledged above it until 6 are left.
    assert stream_ids(redis_client) == [sent[n] for n in (1, 4, 6, 7, 8, 9)]


def test_trained_ids_are_kept_within_the_horizon_and_forgotten_after(redis_client: redis.Redis) -> None:
    c = consumer(redis_client, trained_horizon_s=1.0)

    def send(request_id: str, key: str) -> None:  # raw: the client would itself dedupe a recent key
        redis_client.xadd(
            KEYS.feedback, Feedback(request_id=request_id, label="positive", idempotency_key=key).to_fields()
        )

    send("cmpl-1", "k-old")
    c.finalize(c.poll())
    send("cmpl-1", "k-old")  # a retry inside the horizon: never trains twice
    assert c.poll() == [] and c.counters.duplicates == 1
    time.sleep(1.2)
    send("cmpl-2", "k-new")
    c.finalize(c.poll())  # prunes what was trained more than the horizon ago
    assert redis_client.zrange(KEYS.trained_feedback, 0, -1) == ["k-new"]


def test_a_trained_set_from_before_the_horizon_is_honoured_and_converted(redis_client: redis.Redis) -> None:
    redis_client.sadd(KEYS.trained_feedback, "k-legacy")
    fc = FeedbackClient(redis_client, KEYS)
    c = consumer(redis_client)
    fc.accept("cmpl-1", idempotency_key="k-legacy")
    fc.accept("cmpl-2", idempotency_key="k-2")
    items = c.poll()
    assert [i.feedback_id for i in items] == ["k-2"]
    c.finalize(items)
    assert redis_client.type(KEYS.trained_feedback) == "zset"
    assert set(redis_client.zrange(KEYS.trained_feedback, 0, -1)) == {"k-legacy", "k-2"}
