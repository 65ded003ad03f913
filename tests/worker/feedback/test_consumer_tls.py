"""The worker's feedback consumer over rediss://: its bytes client keeps the TLS settings."""

from __future__ import annotations

from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import JobKeys
from alchemist_protocol.redis_connection import bytes_twin
from alchemist_worker.feedback.consumer import ConsumerSettings, FeedbackConsumer

from tests.fixtures.tls_redis import tls_redis_url  # noqa: F401 - a fixture

KEYS = JobKeys("tls", "job")


def test_consumer_reads_dead_letters_and_finalizes_over_tls(tls_redis_url: str) -> None:  # noqa: F811
    store = JobStore.from_url(tls_redis_url, KEYS.namespace, KEYS.job)
    raw = bytes_twin(store.client)
    raw.delete(KEYS.feedback, KEYS.dead_letters, KEYS.trained_feedback)
    consumer = FeedbackConsumer(store.client, KEYS, ConsumerSettings(consumer="r0"), store.stream_client)
    consumer.ensure_group()
    good = raw.xadd(KEYS.feedback, {b"request_id": b"cmpl-1", b"label": b"positive"}).decode()
    raw.xadd(KEYS.feedback, {b"request_id": b"\xff", b"label": b"positive"})
    items = consumer.poll()
    assert [i.entry_id for i in items] == [good] and raw.xlen(KEYS.dead_letters) == 1
    consumer.finalize(items)
    assert consumer.lag().entries == 0 and raw.xlen(KEYS.feedback) == 0  # acknowledged, then trimmed
    raw.close()
    store.close()
