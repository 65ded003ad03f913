"""The feedback client writes each idempotency key's feedback once, and refuses other feedback under it."""

from __future__ import annotations

import threading

import pytest
import redis
from alchemist_protocol.feedback_client import FeedbackClient, IdempotencyConflict
from alchemist_protocol.keys import JobKeys
from alchemist_protocol.schemas import Feedback, FeedbackLabel

KEYS = JobKeys("ns", "job")


def test_a_repeated_key_returns_the_first_entry_and_adds_nothing(redis_client: redis.Redis) -> None:
    client = FeedbackClient(redis_client, KEYS)
    first = client.submit(Feedback(request_id="cmpl-1", label=FeedbackLabel.POSITIVE, idempotency_key="k"))
    again = client.submit(Feedback(request_id="cmpl-1", label=FeedbackLabel.POSITIVE, idempotency_key="k"))
    assert not first.duplicate and again.duplicate
    assert again.entry_id == first.entry_id
    assert redis_client.xlen(KEYS.feedback) == 1


@pytest.mark.parametrize(
    "other",
    [
        Feedback(request_id="cmpl-1", label=FeedbackLabel.NEGATIVE, idempotency_key="k"),
        Feedback(request_id="cmpl-1", label=FeedbackLabel.CORRECTION, correction="B", idempotency_key="k"),
        Feedback(request_id="cmpl-2", label=FeedbackLabel.CORRECTION, correction="A", idempotency_key="k"),
        Feedback(
            request_id="cmpl-1", label=FeedbackLabel.CORRECTION, correction="A", rating=1, idempotency_key="k"
        ),
    ],
)
def test_other_feedback_under_a_used_key_is_a_conflict(redis_client: redis.Redis, other: Feedback) -> None:
    client = FeedbackClient(redis_client, KEYS)
    entry = client.correct("cmpl-1", "A", idempotency_key="k")
    with pytest.raises(IdempotencyConflict) as raised:
        client.submit(other)
    assert raised.value.entry_id == entry and "'k'" in str(raised.value)
    assert redis_client.xlen(KEYS.feedback) == 1


def test_feedback_without_a_key_is_appended_every_time(redis_client: redis.Redis) -> None:
    client = FeedbackClient(redis_client, KEYS)
    ids = {client.accept("cmpl-1") for _ in range(3)}
    assert len(ids) == 3 and redis_client.xlen(KEYS.feedback) == 3


def test_the_key_is_remembered_for_its_ttl(redis_client: redis.Redis) -> None:
    FeedbackClient(redis_client, KEYS, idempotency_ttl_s=60).accept("cmpl-1", idempotency_key="k")
    assert 0 < redis_client.pttl(KEYS.feedback_idempotency("k")) <= 60_000


def test_concurrent_retries_make_one_entry(redis_url: str) -> None:
    """The check and the append are one script: racing retries cannot both append."""
    ids: list[str] = []

    def retry() -> None:
        client = FeedbackClient(redis.Redis.from_url(redis_url), KEYS)  # bytes replies work too
        for _ in range(20):
            ids.append(client.accept("cmpl-1", idempotency_key="race"))

    threads = [threading.Thread(target=retry) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and len(ids) == 80
    assert redis.Redis.from_url(redis_url).xlen(KEYS.feedback) == 1
