"""The protocol's byte-safe reads of the feedback stream, and dead letters of arbitrary bytes."""

from __future__ import annotations

import base64
import time

import pytest
import redis
from alchemist_protocol.feedback_stream import feedback_lag, trim_acknowledged
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import FEEDBACK_GROUP, JobKeys
from alchemist_protocol.schemas import InvalidFeedback, dead_letter_fields, parse_feedback

KEYS = JobKeys("ns", "job")


def test_job_store_lag_reads_past_entries_that_are_not_utf8(
    redis_client: redis.Redis, redis_url: str
) -> None:
    raw = redis.Redis.from_url(redis_url)
    raw.xadd(KEYS.feedback, {b"\xff": b"\xfe"})
    raw.xadd(KEYS.feedback, {b"label": b"positive"})
    store = JobStore(redis_client, KEYS)
    lag = store.feedback_lag()  # no group yet: the whole stream waits
    assert lag.entries == 2 and 0 <= lag.seconds < 60
    redis_client.xgroup_create(KEYS.feedback, FEEDBACK_GROUP, id="0")
    assert store.feedback_lag().entries == 2  # undelivered, oldest first: the bad one
    raw.xreadgroup(FEEDBACK_GROUP, "c", {KEYS.feedback: ">"}, count=1)
    assert store.feedback_lag().entries == 2  # one pending, one undelivered
    with pytest.raises(UnicodeDecodeError):  # what the decoding client does, and why the store has another
        redis_client.xrange(KEYS.feedback)
    store.close()
    raw.close()


def test_lag_of_a_missing_stream_is_zero_and_nothing_is_trimmed_without_a_group(redis_url: str) -> None:
    raw = redis.Redis.from_url(redis_url)
    assert feedback_lag(raw, "nothing", FEEDBACK_GROUP).entries == 0
    raw.xadd("s", {b"a": b"b"})
    assert trim_acknowledged(raw, "s", FEEDBACK_GROUP, max_len=0) == 0 and raw.xlen("s") == 1
    raw.close()


def test_age_is_that_of_the_oldest_unacknowledged_entry(redis_url: str) -> None:
    raw = redis.Redis.from_url(redis_url)
    old_ms = int(time.time() * 1000) - 30_000
    raw.xadd("s", {b"a": b"b"}, id=f"{old_ms}-0")
    raw.xgroup_create("s", FEEDBACK_GROUP, id="0")
    assert 29 < feedback_lag(raw, "s", FEEDBACK_GROUP).seconds < 60
    raw.close()


def test_parse_feedback_refuses_bytes_that_are_not_utf8_and_says_where() -> None:
    with pytest.raises(InvalidFeedback, match=r"field 'request_id' is not UTF-8 \(byte 0xff at offset 3\)"):
        parse_feedback({b"request_id": b"abc\xff", b"label": b"positive"})
    with pytest.raises(InvalidFeedback, match="a field name"):
        parse_feedback({b"\xc3(": b"x"})
    assert parse_feedback({b"request_id": "é".encode(), b"label": b"positive"}).request_id == "é"


def test_dead_letter_fields_are_text_cut_on_a_character_boundary_or_base64() -> None:
    letter = dead_letter_fields(
        "1-0", {b"text": "é" * 10, b"bin": b"\x00\xff" * 10, b"\xff": b"v"}, "r", max_field_bytes=5
    )
    assert letter["orig.text"] == "éé"  # 5 bytes hold two 2-byte characters and half a third: dropped
    assert base64.b64decode(letter["orig_b64.bin"]) == b"\x00\xff\x00\xff\x00"
    assert letter["orig.\\xff"] == "v"
    assert letter["truncated"] == "text:20,bin:20"
    assert dead_letter_fields("1-0", {"s": "\udcff"}, "r")["orig_b64.s"]  # a lone surrogate is not text
