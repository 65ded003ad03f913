"""A real in-process worker whose feedback processing fails keeps its lease, heartbeat and version following,
and /readyz says why it is unhealthy; a non-UTF-8 entry no longer stalls anything."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import redis
from alchemist_protocol.keys import FEEDBACK_GROUP
from alchemist_protocol.schemas import RolloutPointer
from alchemist_worker.api.metrics import ServingMetrics
from alchemist_worker.api.server import ServerState, build_app
from alchemist_worker.continual.router import continual_router
from alchemist_worker.rollout.follower import FollowMode
from fastapi.testclient import TestClient

from tests.worker.continual.conftest import KEYS, InProcessWorker, wait_until

PROMPT = [1, 5, 9, 13, 17]


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def api(worker: InProcessWorker) -> TestClient:
    state = ServerState(worker.loop, ServingMetrics(worker.loop))
    state.readiness_checks.append(worker.runtime.readiness_problem)
    app = build_app(state)
    runtime = worker.runtime
    app.include_router(
        continual_router(
            runtime.store,
            runtime.control.status,
            runtime.score,
            encode_prompt=runtime.engine.tokenizer.encode,
            encode_chat=runtime.engine.tokenizer.apply_chat_template,
            encode_continuation=runtime.continuation_tokens,
        )
    )
    return TestClient(app)


def duty_failures(worker: InProcessWorker, duty: str) -> float:
    registry = worker.runtime.metrics.registry
    return registry.get_sample_value("alchemist_control_duty_failures_total", {"duty": duty}) or 0.0


def heartbeat_at(worker: InProcessWorker) -> float:
    return next(r.heartbeat_at for r in worker.store.live_replicas() if r.replica == "r0")


def test_non_utf8_feedback_is_dead_lettered_while_training_and_the_routes_go_on(
    make_worker: Callable[..., InProcessWorker], raw: redis.Redis
) -> None:
    worker = make_worker()
    client = api(worker)
    wait_until(lambda: worker.runtime.control.training, 10, "the lease")
    raw.xadd(KEYS.feedback, {b"request_id": b"\xff\xfe", b"label": b"positive"})
    assert client.get("/v1/versions").status_code == 200  # lag reads past the undelivered entry
    out = worker.generate(PROMPT)
    worker.feedback.accept(out.request_id)
    worker.wait_version(1)
    dead = raw.xrange(KEYS.dead_letters)
    assert len(dead) == 1 and b"not UTF-8" in dead[0][1][b"reason"]
    wait_until(
        lambda: int(raw.xpending(KEYS.feedback, FEEDBACK_GROUP)["pending"]) == 0, 10, "all acknowledged"
    )
    assert client.get("/readyz").json() == {"status": "ready"}
    assert duty_failures(worker, "feedback") == 0


def test_heartbeat_and_following_go_on_while_feedback_processing_fails_and_readyz_says_so(
    make_worker: Callable[..., InProcessWorker], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = make_worker(follow=FollowMode.POINTER)
    client = api(worker)
    worker.store.set_rollout(RolloutPointer(stable_version=0))
    out = worker.generate(PROMPT)
    worker.feedback.accept(out.request_id)
    worker.wait_version(1)
    worker.runtime.control.duties.stall_s = 1.0

    def poisoned(block_ms: int | None = None) -> list[object]:
        raise RuntimeError("feedback processing is broken")

    monkeypatch.setattr(worker.runtime.consumer, "poll", poisoned)
    beat = heartbeat_at(worker)
    worker.store.set_rollout(RolloutPointer(stable_version=0, canary_version=1, canary_replicas=["r0"]))
    worker.wait_serving(1, timeout=10)  # following goes on
    wait_until(lambda: heartbeat_at(worker) > beat, 5, "a heartbeat")  # and so does the heartbeat
    assert worker.runtime.control.lease.held and duty_failures(worker, "feedback") >= 1
    wait_until(lambda: client.get("/readyz").status_code == 503, 10, "/readyz to turn 503")
    body = client.get("/readyz").json()
    assert "feedback" in body["reason"] and "feedback processing is broken" in body["reason"]
    assert client.get("/v1/versions").status_code == 200
    monkeypatch.undo()
    wait_until(lambda: client.get("/readyz").status_code == 200, 10, "/readyz to recover")


def test_a_duty_that_never_returns_makes_readyz_503(
    make_worker: Callable[..., InProcessWorker], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = make_worker()
    client = api(worker)
    wait_until(lambda: worker.runtime.control.training, 10, "the lease")
    worker.runtime.control.duties.stall_s = 0.5
    release = threading.Event()
    decide = worker.runtime.control.follower.decide
    monkeypatch.setattr(
        worker.runtime.control.follower, "decide", lambda serving: (release.wait(30), decide(serving))[1]
    )
    try:
        wait_until(lambda: client.get("/readyz").status_code == 503, 10, "/readyz to turn 503")
        assert "in duty follow" in client.get("/readyz").json()["reason"]
    finally:
        release.set()
    monkeypatch.undo()
    wait_until(lambda: client.get("/readyz").status_code == 200, 10, "/readyz to recover")
