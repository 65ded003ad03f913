import time

import redis
from alchemist_protocol.feedback_client import FeedbackClient
from alchemist_protocol.keys import FEEDBACK_GROUP, JobKeys
from alchemist_protocol.schemas import Feedback, FeedbackLabel
from alchemist_worker.feedback.consumer import ConsumerSettings, FeedbackConsumer

KEYS = JobKeys("ns", "job")


def consumer(client: redis.Redis, name: str = "r0", **kw: int | float) -> FeedbackConsumer:
    c = FeedbackConsumer(client, KEYS, ConsumerSettings(consumer=name, **kw))  # type: ignore[arg-type]
    c.ensure_group()
    return c


def pending(client: redis.Redis) -> int:
    return int(client.xpending(KEYS.feedback, FEEDBACK_GROUP)["pending"])


def test_invalid_entries_go_to_dead_letters_with_reason_and_fields(redis_client: redis.Redis) -> None:
    c = consumer(redis_client)
    redis_client.xadd(KEYS.feedback, {"request_id": "cmpl-1", "label": "meh"})
    redis_client.xadd(KEYS.feedback, {"request_id": "cmpl-2", "label": "positive"})
    items = c.poll()
    assert [i.feedback.request_id for i in items] == ["cmpl-2"]
    dead = redis_client.xrange(KEYS.dead_letters)
    assert len(dead) == 1
    fields = dead[0][1]
    assert (
        "label" in fields["reason"]
        and fields["orig.label"] == "meh"
        and fields["orig.request_id"] == "cmpl-1"
    )
    assert pending(redis_client) == 1  # the dead one is acknowledged, the valid one waits for its step
    assert c.counters.dead_letters == 1


def test_finalize_acks_counts_per_version_and_is_idempotent(redis_client: redis.Redis) -> None:
    c = consumer(redis_client)
    fc = FeedbackClient(redis_client, KEYS)
    fc.accept("cmpl-1")
    fc.correct("cmpl-2", "better")
    items = c.poll()
    assert len(items) == 2
    versions = {items[0].feedback_id: 3, items[1].feedback_id: 3}
    assert c.finalize(items, versions) == 2
    assert pending(redis_client) == 0
    assert redis_client.hgetall(KEYS.version_feedback(3)) == {"positive": "1", "correction": "1"}
    assert c.finalize(items, versions) == 0  # again (a crash between commit and ack, then a redo)
    assert redis_client.hgetall(KEYS.version_feedback(3)) == {"positive": "1", "correction": "1"}
    assert set(redis_client.zrange(KEYS.trained_feedback, 0, -1)) == {i.feedback_id for i in items}


def test_same_feedback_id_never_trains_twice(redis_client: redis.Redis) -> None:
    c = consumer(redis_client)
    # Written straight to the stream: the client itself dedupes a key it saw recently, a raw writer does not.
    fields = Feedback(request_id="cmpl-1", label=FeedbackLabel.POSITIVE, idempotency_key="k1").to_fields()
    redis_client.xadd(KEYS.feedback, fields)
    redis_client.xadd(KEYS.feedback, fields)
    items = c.poll()
    assert len(items) == 1 and len(items[0].entry_ids) == 2
    c.finalize(items)
    assert pending(redis_client) == 0
    redis_client.xadd(KEYS.feedback, fields)  # the application retries long after
    assert c.poll() == []
    assert pending(redis_client) == 0
    assert c.counters.duplicates == 2


def test_restarted_consumer_gets_its_unacknowledged_entries_back(redis_client: redis.Redis) -> None:
    fc = FeedbackClient(redis_client, KEYS)
    for n in range(5):
        fc.accept(f"cmpl-{n}")
    first = consumer(redis_client, read_count=2)
    got = first.poll() + first.poll()
    assert len(got) == 4
    first.finalize(got[:1])
    # The process dies; a new one with the same name re-reads what it had pending, in pages, then new ones.
    second = consumer(redis_client, read_count=2)
    again = [i.feedback.request_id for _ in range(4) for i in second.poll()]
    assert again == ["cmpl-1", "cmpl-2", "cmpl-3", "cmpl-4"]


def test_entries_of_a_dead_consumer_are_claimed(redis_client: redis.Redis) -> None:
    fc = FeedbackClient(redis_client, KEYS)
    fc.accept("cmpl-1")
    dead = consumer(redis_client, name="r-dead")
    assert len(dead.poll()) == 1
    alive = consumer(redis_client, name="r-alive", claim_idle_ms=100, claim_every_s=0.0)
    assert alive.poll() == []  # not idle long enough yet
    time.sleep(0.15)
    items = alive.poll()
    assert [i.feedback.request_id for i in items] == ["cmpl-1"] and alive.counters.claimed == 1
    alive.finalize(items)
    assert pending(redis_client) == 0


def test_back_pressure_bounds_what_is_held(redis_client: redis.Redis) -> None:
    fc = FeedbackClient(redis_client, KEYS)
    for n in range(5):
        fc.accept(f"cmpl-{n}")
    c = consumer(redis_client, max_held=3)
    items = c.poll()
    assert len(items) == 3 and not c.has_room
    assert c.poll() == []
    lag = c.lag()
    assert lag.entries == 5 and lag.seconds >= 0.0
    c.finalize(items[:2])
    assert len(c.poll()) == 2
    assert c.lag().entries == 3


def test_lag_counts_undelivered_and_pending(redis_client: redis.Redis) -> None:
    c = consumer(redis_client)
    assert c.lag().entries == 0
    redis_client.xadd(
        KEYS.feedback, {"request_id": "x", "label": "positive"}, id=f"{int(time.time() * 1000) - 2000}-0"
    )
    lag = c.lag()
    assert lag.entries == 1 and lag.seconds >= 1.9


def test_recovers_when_redis_lost_the_group(redis_client: redis.Redis) -> None:
    c = consumer(redis_client)
    FeedbackClient(redis_client, KEYS).accept("cmpl-1")
    assert len(c.poll()) == 1
    redis_client.flushall()
    assert c.poll() == []  # NOGROUP: recreated
    FeedbackClient(redis_client, KEYS).reject("cmpl-2")
    assert [i.feedback.label for i in c.poll()] == [FeedbackLabel.NEGATIVE]


def test_a_named_feedback_stream_is_consumed_and_the_default_left_alone(redis_client: redis.Redis) -> None:
    named = JobKeys("ns", "job", feedback_stream="shop:reactions")
    c = FeedbackConsumer(redis_client, named, ConsumerSettings(consumer="r0"))
    c.ensure_group()
    FeedbackClient(redis_client, named).accept("cmpl-9")
    assert redis_client.xlen("shop:reactions") == 1 and not redis_client.exists(KEYS.feedback)
    assert [i.feedback.request_id for i in c.poll()] == ["cmpl-9"]
