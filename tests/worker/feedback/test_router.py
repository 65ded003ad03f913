import threading
import time

import pytest
import redis
from alchemist_protocol.feedback_client import FeedbackClient
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import JobKeys
from alchemist_protocol.schemas import FeedbackLabel, RequestRecord, parse_feedback
from alchemist_worker.api.errors import install_error_handlers
from alchemist_worker.feedback.router import feedback_router
from fastapi import FastAPI
from fastapi.testclient import TestClient

KEYS = JobKeys("ns", "job")


@pytest.fixture
def api(redis_client: redis.Redis) -> TestClient:
    store = JobStore(redis_client, KEYS)
    store.put_request(
        RequestRecord(
            request_id="cmpl-1", prompt_tokens=[1], response_tokens=[2], replica="r0", version=0, model="m"
        ),
        ttl_seconds=60,
    )
    app = FastAPI()
    install_error_handlers(app)
    backlog = lambda: int(redis_client.xlen(KEYS.feedback))
    app.include_router(
        feedback_router(
            FeedbackClient(redis_client, KEYS), store, max_backlog=3, backlog=backlog, record_grace_s=0.2
        )
    )
    return TestClient(app)


def test_feedback_is_queued_on_the_stream(api: TestClient, redis_client: redis.Redis) -> None:
    r = api.post("/v1/feedback", json={"response_id": "cmpl-1", "label": "correct", "correction": "Paris."})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "queued" and body["label"] == "correction"
    ((entry_id, fields),) = redis_client.xrange(KEYS.feedback)
    assert entry_id == body["id"]
    fb = parse_feedback(fields)
    assert fb.label is FeedbackLabel.CORRECTION and fb.correction == "Paris." and fb.request_id == "cmpl-1"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"label": "positive"}, 400, "response_id"),
        ({"response_id": "cmpl-1", "label": "meh"}, 400, "label"),
        ({"response_id": "cmpl-1", "label": "correction"}, 400, None),
        ({"response_id": "cmpl-1", "label": "positive", "rating": 3}, 400, "rating"),
        ({"response_id": "cmpl-1", "label": "positive", "colour": "red"}, 400, "colour"),
        ({"response_id": "cmpl-404", "label": "positive"}, 404, "response_id"),
    ],
)
def test_bad_feedback_gets_an_openai_style_error(
    api: TestClient, redis_client: redis.Redis, body: dict[str, object], status: int, param: str | None
) -> None:
    r = api.post("/v1/feedback", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["param"] == param
    assert redis_client.xlen(KEYS.feedback) == 0


def test_backlog_bound_answers_429(api: TestClient) -> None:
    for _ in range(3):
        assert api.post("/v1/feedback", json={"response_id": "cmpl-1", "label": "accept"}).status_code == 202
    r = api.post("/v1/feedback", json={"response_id": "cmpl-1", "label": "accept"})
    assert r.status_code == 429 and r.headers["retry-after"] == "5"
    assert r.json()["error"]["code"] == "feedback_backlog"


def test_redis_down_is_a_503(redis_server, redis_client: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(feedback_router(FeedbackClient(redis_client, KEYS)))
    redis_server.kill()
    try:
        r = TestClient(app).post("/v1/feedback", json={"response_id": "x", "label": "positive"})
        assert r.status_code == 503 and "unreachable" in r.json()["error"]["message"]
    finally:
        redis_server.start()


def test_a_record_written_just_after_the_response_is_waited_for(
    api: TestClient, redis_client: redis.Redis
) -> None:
    def write_late() -> None:
        time.sleep(0.1)
        JobStore(redis_client, KEYS).put_request(
            RequestRecord(
                request_id="cmpl-late",
                prompt_tokens=[1],
                response_tokens=[2],
                replica="r0",
                version=0,
                model="m",
            ),
            ttl_seconds=60,
        )

    writer = threading.Thread(target=write_late)
    writer.start()
    r = api.post("/v1/feedback", json={"response_id": "cmpl-late", "label": "accept"})
    writer.join()
    assert r.status_code == 202, r.text
