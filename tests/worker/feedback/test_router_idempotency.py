"""POST /v1/feedback: idempotency keys, corrections that could never train, and waits that hold no thread."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
import redis
from alchemist_protocol.feedback_client import FeedbackClient
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import JobKeys
from alchemist_protocol.schemas import Feedback, RequestRecord
from alchemist_worker.api.errors import install_error_handlers
from alchemist_worker.feedback.router import feedback_router
from alchemist_worker.feedback.samples import SampleResolver
from fastapi import FastAPI
from fastapi.testclient import TestClient

KEYS = JobKeys("ns", "job")
END = 0  # the end-of-turn token a correction is given
MAX_SAMPLE = 40


def _encode(text: str) -> list[int]:
    return [b + 1 for b in text.encode()]  # one token per byte, never the end token


@pytest.fixture
def app(redis_client: redis.Redis) -> FastAPI:
    store = JobStore(redis_client, KEYS)
    record = RequestRecord(
        request_id="cmpl-1",
        prompt_tokens=[5] * 10,
        response_tokens=[7, END],
        replica="r0",
        version=0,
        model="m",
    )
    store.put_request(record, ttl_seconds=60)
    resolver = SampleResolver(store, _encode, [END], max_tokens=MAX_SAMPLE, end_token=END)

    def sample_tokens(record: RequestRecord, feedback: Feedback) -> int:
        return len(record.prompt_tokens) + len(resolver.response_tokens(record, feedback.correction))

    app = FastAPI()
    install_error_handlers(app)
    app.include_router(
        feedback_router(
            FeedbackClient(redis_client, KEYS),
            store,
            record_grace_s=1.0,
            sample_tokens=sample_tokens,
            max_sample_tokens=MAX_SAMPLE,
        )
    )
    return app


@pytest.fixture
def api(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as client:
        yield client


def test_a_repeated_key_answers_the_first_entry_and_queues_nothing(
    api: TestClient, redis_client: redis.Redis
) -> None:
    body = {"response_id": "cmpl-1", "label": "correction", "correction": "Paris.", "idempotency_key": "k1"}
    first = api.post("/v1/feedback", json=body)
    again = api.post("/v1/feedback", json=body)
    assert first.status_code == 202 and first.json()["duplicate"] is False
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert again.json()["id"] == first.json()["id"]
    assert redis_client.xlen(KEYS.feedback) == 1


def test_a_conflicting_label_under_a_used_key_is_a_409(api: TestClient, redis_client: redis.Redis) -> None:
    assert (
        api.post(
            "/v1/feedback", json={"response_id": "cmpl-1", "label": "accept", "idempotency_key": "k2"}
        ).status_code
        == 202
    )
    r = api.post("/v1/feedback", json={"response_id": "cmpl-1", "label": "reject", "idempotency_key": "k2"})
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "idempotency_conflict" and error["param"] == "idempotency_key"
    assert "'k2'" in error["message"]
    assert redis_client.xlen(KEYS.feedback) == 1


def test_a_correction_that_can_never_fit_a_step_is_refused_at_once(
    api: TestClient, redis_client: redis.Redis
) -> None:
    fits = "x" * (MAX_SAMPLE - 10 - 1)  # prompt 10 + correction + end token = MAX_SAMPLE
    assert (
        api.post(
            "/v1/feedback", json={"response_id": "cmpl-1", "label": "correct", "correction": fits}
        ).status_code
        == 202
    )
    r = api.post("/v1/feedback", json={"response_id": "cmpl-1", "label": "correct", "correction": fits + "x"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "sample_too_long" and error["param"] == "correction"
    assert f"{MAX_SAMPLE + 1} tokens" in error["message"]
    assert redis_client.xlen(KEYS.feedback) == 1


async def test_unknown_ids_waiting_for_their_record_do_not_hold_up_other_feedback(app: FastAPI) -> None:
    """60 unknown ids each wait a second for a record; before, each held a pool thread (40 of them)."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        unknown = [
            asyncio.ensure_future(
                client.post("/v1/feedback", json={"response_id": f"cmpl-x{i}", "label": "accept"})
            )
            for i in range(60)
        ]
        await asyncio.sleep(0.1)
        started = time.monotonic()
        known = await client.post("/v1/feedback", json={"response_id": "cmpl-1", "label": "accept"})
        took = time.monotonic() - started
        answers = await asyncio.gather(*unknown)
    assert known.status_code == 202 and took < 0.5, f"known feedback took {took:.2f} s"
    assert {a.status_code for a in answers} == {404}
