"""Hostile stream entries: whatever bytes an application writes, the consumer dead-letters or trains each entry,
and nothing stays pending or holds back the valid entries read with it."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
import redis
from alchemist_protocol.feedback_client import FeedbackClient
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import FEEDBACK_GROUP, JobKeys
from alchemist_worker.feedback.consumer import ConsumerSettings, FeedbackConsumer, FeedbackItem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

KEYS = JobKeys("ns", "job")
VALID = {b"request_id": b"cmpl-1", b"label": b"positive"}


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """Writes entries byte for byte, as any application could."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def consumer(client: redis.Redis, name: str = "r0", **kw: int | float) -> FeedbackConsumer:
    c = FeedbackConsumer(client, KEYS, ConsumerSettings(consumer=name, trim_every_s=0, **kw))  # type: ignore[arg-type]
    c.ensure_group()
    return c


def pending(client: redis.Redis) -> int:
    return int(client.xpending(KEYS.feedback, FEEDBACK_GROUP)["pending"])


def dead_letters(raw: redis.Redis) -> dict[str, dict[str, str]]:
    """source entry id -> the dead letter's fields (read as bytes: the letter itself must be valid text)."""
    return {
        fields[b"source_id"].decode(): {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in raw.xrange(KEYS.dead_letters)
    }


def drain(c: FeedbackConsumer) -> list[FeedbackItem]:
    """Polls until every entry was delivered (a read of only invalid entries returns no item)."""
    got: list[FeedbackItem] = []
    for _ in range(1000):
        batch = c.poll()
        got += batch
        if not batch and c.lag().entries == c.held:
            return got
    raise AssertionError("the consumer never caught up")


def test_a_non_utf8_entry_is_dead_lettered_and_the_others_in_its_read_still_train(
    redis_client: redis.Redis, raw: redis.Redis
) -> None:
    c = consumer(redis_client)
    first = raw.xadd(KEYS.feedback, {b"request_id": b"cmpl-1", b"label": b"positive"}).decode()
    bad = raw.xadd(KEYS.feedback, {b"request_id": b"cmpl-\xff\xfe", b"label": b"positive"}).decode()
    last = raw.xadd(KEYS.feedback, {b"request_id": b"cmpl-3", b"label": b"negative"}).decode()
    items = c.poll()  # one read delivers all three
    assert [i.entry_id for i in items] == [first, last]
    letter = dead_letters(raw)[bad]
    assert "not UTF-8" in letter["reason"] and "request_id" in letter["reason"]
    assert base64.b64decode(letter["orig_b64.request_id"]) == b"cmpl-\xff\xfe"
    assert letter["orig.label"] == "positive"
    assert pending(redis_client) == 2 and c.lag().entries == 2
    c.finalize(items)
    assert pending(redis_client) == 0 and c.lag().entries == 0


def test_lag_and_the_job_store_read_past_an_undelivered_non_utf8_entry(
    redis_client: redis.Redis, raw: redis.Redis
) -> None:
    c = consumer(redis_client)
    raw.xadd(KEYS.feedback, {b"\xc3(": b"\x80" * 10})
    assert c.lag().entries == 1 and c.lag().seconds >= 0
    store = JobStore(redis_client, KEYS)
    assert store.feedback_lag().entries == 1
    store.close()


def test_claimed_entries_of_a_dead_consumer_are_dead_lettered_too(
    redis_client: redis.Redis, raw: redis.Redis
) -> None:
    consumer(redis_client)  # creates the group
    bad = raw.xadd(KEYS.feedback, {b"label": b"\xff"}).decode()
    good = raw.xadd(KEYS.feedback, VALID).decode()
    # A consumer that reads (as bytes, so it survives) and dies before acknowledging anything.
    raw.xreadgroup(FEEDBACK_GROUP, "dead", {KEYS.feedback: ">"})
    c = consumer(redis_client, "r1", claim_idle_ms=1)
    items = drain(c)
    assert [i.entry_id for i in items] == [good] and set(dead_letters(raw)) == {bad}
    assert c.counters.claimed == 2
    c.finalize(items)
    assert pending(redis_client) == 0


def test_a_restarted_consumer_rereads_its_own_pending_non_utf8_entry_and_dead_letters_it(
    redis_client: redis.Redis, raw: redis.Redis
) -> None:
    consumer(redis_client)
    bad = raw.xadd(KEYS.feedback, {b"request_id": b"\xff", b"label": b"positive"}).decode()
    raw.xreadgroup(FEEDBACK_GROUP, "r0", {KEYS.feedback: ">"})  # delivered before a crash, never acknowledged
    c = consumer(redis_client, "r0")
    assert drain(c) == [] and set(dead_letters(raw)) == {bad} and pending(redis_client) == 0


def test_dead_letters_are_cut_to_a_bound_and_the_dead_stream_is_capped(
    redis_client: redis.Redis, raw: redis.Redis
) -> None:
    c = consumer(redis_client, dead_letter_field_bytes=1000, dead_letter_max_len=100, read_count=256)
    huge = raw.xadd(KEYS.feedback, {b"request_id": b"x" * 5_000_000, b"label": b"meh"}).decode()
    drain(c)
    letter = dead_letters(raw)[huge]
    assert letter["orig.request_id"] == "x" * 1000 and letter["truncated"] == "request_id:5000000"
    assert len(letter["reason"]) <= 1000
    pipe = raw.pipeline(transaction=False)
    for n in range(1000):
        pipe.xadd(KEYS.feedback, {b"label": str(n).encode()})
    pipe.execute()
    drain(c)
    assert c.counters.dead_letters == 1001 and pending(redis_client) == 0
    # MAXLEN ~ trims whole macro nodes (100 entries by default): about the bound, never unbounded.
    assert 100 <= raw.xlen(KEYS.dead_letters) <= 200


entry_fields = st.dictionaries(
    st.binary(min_size=1, max_size=12) | st.sampled_from([b"request_id", b"label", b"correction"]),
    st.binary(max_size=24) | st.sampled_from([b"positive", b"negative", b"cmpl-7"]),
    min_size=1,
    max_size=4,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(entry_fields, st.just(VALID)), min_size=1, max_size=12), st.integers(1, 5))
def test_fuzz_every_entry_ends_trained_or_dead_lettered_and_nothing_stays_pending(
    redis_client: redis.Redis, raw: redis.Redis, entries: list[dict[bytes, bytes]], read_count: int
) -> None:
    raw.flushall()
    c = consumer(redis_client, read_count=read_count)
    valid = FeedbackClient(redis_client, KEYS).accept("cmpl-valid")  # a valid entry in the mix, always
    written = {valid} | {raw.xadd(KEYS.feedback, fields).decode() for fields in entries}
    items = drain(c)
    c.finalize(items)
    trained = {e for item in items for e in item.entry_ids}
    dead = dead_letters(raw)
    assert all(letter["reason"] for letter in dead.values())
    assert trained | set(dead) == written and not trained & set(dead)
    assert valid in trained  # whatever came with it
    assert pending(redis_client) == 0 and c.lag().entries == 0
