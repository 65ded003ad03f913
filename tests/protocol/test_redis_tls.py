"""rediss:// URLs: the job store, the feedback client and the bytes client all talk TLS to a real server."""

from __future__ import annotations

import pytest
import redis
from alchemist_protocol.feedback_client import FeedbackClient
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.redis_connection import bytes_twin, connect
from alchemist_protocol.schemas import RequestRecord

from tests.fixtures.tls_redis import tls_redis_url  # noqa: F401 - a fixture


def test_job_store_and_feedback_client_over_tls(tls_redis_url: str) -> None:  # noqa: F811
    store = JobStore.from_url(tls_redis_url, "ns", "job")
    record = RequestRecord(
        request_id="cmpl-1", prompt_tokens=[1], response_tokens=[2], replica="r0", version=0, model="m"
    )
    store.put_request(record, ttl_seconds=60)
    assert store.get_request("cmpl-1") == record
    feedback = FeedbackClient.from_url(tls_redis_url, "ns", "job")
    feedback.accept("cmpl-1")
    # The bytes client keeps the TLS settings: it reads the stream over the same encrypted connection kind.
    assert store.feedback_lag().entries == 1
    assert issubclass(store.stream_client.connection_pool.connection_class, redis.SSLConnection)
    store.close()
    feedback.client.close()


def test_bytes_twin_of_a_tls_client_reads_raw_entries(tls_redis_url: str) -> None:  # noqa: F811
    client = connect(tls_redis_url)
    raw = bytes_twin(client)
    raw.xadd("s", {b"k": b"\xff"})
    assert raw.xrange("s")[0][1] == {b"k": b"\xff"}
    raw.close()
    client.close()


def test_tls_server_refuses_a_client_that_does_not_trust_its_ca(tls_redis_url: str) -> None:  # noqa: F811
    untrusted = tls_redis_url.split("?", 1)[0]  # the system's CAs only
    with pytest.raises(redis.ConnectionError):
        connect(untrusted, socket_connect_timeout=2).ping()


def test_plain_redis_url_cannot_talk_to_a_tls_only_server(tls_redis_url: str) -> None:  # noqa: F811
    plain = tls_redis_url.replace("rediss://", "redis://").split("?", 1)[0]
    with pytest.raises(redis.RedisError):
        connect(plain, socket_connect_timeout=2, socket_timeout=2).ping()


def test_connect_rejects_other_schemes() -> None:
    with pytest.raises(ValueError, match="rediss://"):
        connect("http://127.0.0.1:6379/0")
