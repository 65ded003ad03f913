"""Scores as interruptible engine work: a long score does not hold up serving, and must fit the context."""

from __future__ import annotations

import time
from collections.abc import Callable

from alchemist_worker.api.errors import install_error_handlers
from alchemist_worker.continual.router import continual_router
from alchemist_worker.continual.step_cursor import cursor_yield
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.worker.continual.conftest import InProcessWorker

PROMPT = [1, 5, 9, 13, 17]


def test_a_long_score_runs_in_slices_while_requests_are_served(
    make_worker: Callable[..., InProcessWorker],
) -> None:
    worker = make_worker(slice_ms=10.0)
    worker.generate(PROMPT)  # warm

    def long_work() -> str:  # 1.5 s of engine-thread work with a yield point every 5 ms, like a forward
        until = time.perf_counter() + 1.5
        while time.perf_counter() < until:
            time.sleep(0.005)
            cursor_yield()
        return "scored"

    started = time.monotonic()
    pending = worker.runtime.scores.submit(long_work)
    time.sleep(0.1)  # the score is under way
    served_at = []
    for _ in range(3):
        worker.generate(PROMPT, max_tokens=4)
        served_at.append(time.monotonic() - started)
    assert pending.result(timeout=30) == "scored"
    finished = time.monotonic() - started
    # Before, the whole score ran in one piece between two iterations: every request waited 1.5 s for it.
    assert served_at[-1] < 1.2, f"requests were served at {served_at} while the score took {finished:.2f} s"
    assert finished >= 1.5
    assert worker.runtime.scores.longest_slice_s < 0.2


def test_scores_through_the_route_fit_the_context_and_match_the_direct_score(
    make_worker: Callable[..., InProcessWorker],
) -> None:
    worker = make_worker()
    runtime = worker.runtime
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(
        continual_router(
            runtime.store,
            runtime.control.status,
            runtime.submit_score,
            encode_prompt=lambda text: [int(t) for t in text.split()],
            encode_chat=lambda messages: [1],
            encode_continuation=lambda text: [int(t) for t in text.split()],
            max_model_len=runtime.engine.max_model_len,
        )
    )
    client = TestClient(app)
    limit = runtime.engine.max_model_len
    r = client.post("/v1/score", json={"prompt": "1 5 9 13", "continuation": "17 21"})
    assert r.status_code == 200, r.text
    direct, version = runtime.score([1, 5, 9, 13], [17, 21])
    assert abs(r.json()["logprob"] - direct) < 1e-4 and r.json()["version"] == version == 0
    too_long = " ".join(["7"] * (limit - 3))
    r = client.post("/v1/score", json={"prompt": "1 5 9 13", "continuation": too_long})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and str(limit) in error["message"]
