"""Inputs from a hostile client: each is a 4xx naming what is wrong, never a 500, and never hurts another
request. Bodies are sent as raw JSON, so that values no client library would send (2**64, NaN, a lone
surrogate escaped as \\ud800) reach the server as they would from anyone."""

from __future__ import annotations

import concurrent.futures
import json
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import JobKeys
from alchemist_worker.api.errors import install_error_handlers
from alchemist_worker.continual.router import continual_router
from alchemist_worker.engine.sequence import Sequence
from alchemist_worker.engine.serving_tokenizer import ServingTokenizer
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.worker.api.conftest import RunningWorker

CULPRIT_SEED = 4242  # a valid seed; the tests make the engine fail on it, as an unknown bug would


@pytest.fixture(scope="module")
def server(tiny_server: RunningWorker) -> RunningWorker:
    """The module's tiny worker, its iterations slowed a little so that concurrent streams overlap."""
    tiny_server.worker.loop.add_between_iterations(lambda: time.sleep(0.01))
    return tiny_server


def post(server: RunningWorker, path: str, body: dict[str, Any]) -> httpx.Response:
    """`body` as JSON exactly as written: out-of-range integers, NaN, and lone surrogates as \\u escapes."""
    content = json.dumps(body).encode()  # ensure_ascii: a lone surrogate travels as its escape
    return httpx.post(
        server.base_url + path, content=content, headers={"content-type": "application/json"}, timeout=30
    )


def openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


COMPLETION = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/completions", {"seed": 2**64}, "seed"),
        ("/v1/completions", {"seed": -(2**63) - 1}, "seed"),
        ("/v1/chat/completions", {"seed": 2**64, "temperature": 0.7}, "seed"),
        ("/v1/completions", {"top_k": 10**12, "top_p": 0.5}, "top_k"),
        ("/v1/completions", {"stop_token_ids": [10**9]}, "stop_token_ids"),
        ("/v1/completions", {"stop": ["x" * 5000]}, "stop"),
        ("/v1/completions", {"temperature": float("nan")}, "temperature"),
        ("/v1/completions", {"presence_penalty": float("inf")}, "presence_penalty"),
        ("/v1/completions", {"max_tokens": 2**70}, "max_tokens"),
        ("/v1/completions", {"logprobs": 2**40}, "logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 2**40}, "top_logprobs"),
        ("/v1/chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ],
)
def test_sampling_values_out_of_range_are_400_naming_the_field(
    server: RunningWorker, path: str, fields: dict[str, Any], param: str
) -> None:
    base = COMPLETION if path == "/v1/completions" else CHAT
    error = openai_error(post(server, path, {**base, **fields}), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),
        ("/v1/completions", {"prompt": ["\udfff"]}, "prompt.0"),
        ("/v1/completions", {"stop": "\ud800"}, "stop"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "x\udc00"}]}]},
            "messages.0.content.0.text",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": "\ud800"}]}, None),
        ("/v1/chat/completions", {"user": "\ud800"}, "user"),
    ],
)
def test_lone_surrogates_are_400(
    server: RunningWorker, path: str, fields: dict[str, Any], param: str | None
) -> None:
    base = COMPLETION if path == "/v1/completions" else CHAT
    error = openai_error(post(server, path, {**base, **fields}), 400)
    assert error["code"] == "invalid_text" and (param is None or error["param"] == param)


def test_a_lone_surrogate_in_a_model_or_field_name_is_an_openai_error(server: RunningWorker) -> None:
    error = openai_error(post(server, "/v1/completions", {**COMPLETION, "model": "m\ud800"}), 404)
    assert "\\ud800" in error["message"]
    openai_error(post(server, "/v1/completions", {**COMPLETION, "\ud800": 1}), 400)  # as a field name too


def stream_text(server: RunningWorker, prompt: str) -> tuple[str, str | None, int]:
    """Streams a greedy completion; returns its text, finish reason and completion tokens."""
    body = {
        **COMPLETION, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    text, reason, tokens = "", None, 0
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if chunk["choices"]:
                text += chunk["choices"][0]["text"]
                reason = chunk["choices"][0]["finish_reason"] or reason
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return text, reason, tokens


def test_a_request_failing_inside_the_engine_fails_alone(
    server: RunningWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = ["one stream", "another stream", "a third stream"]
    alone = [stream_text(server, p) for p in prompts]
    runner = server.worker.engine.runner
    real_generator = runner._generator

    def generator(seq: Sequence) -> Any:  # the culprit breaks the sampler once it decodes among the others
        if seq.params.seed == CULPRIT_SEED and seq.num_output_tokens >= 1:
            raise ValueError("Overflow when unpacking long long")
        return real_generator(seq)

    monkeypatch.setattr(runner, "_generator", generator)
    culprit = {**COMPLETION, "max_tokens": 12, "seed": CULPRIT_SEED, "temperature": 1.0, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(stream_text, server, p) for p in prompts]
        deadline = time.monotonic() + 30  # the streams are decoding (however slow the machine is) ...
        while server.worker.loop.stats.num_running < len(prompts) and time.monotonic() < deadline:
            time.sleep(0.005)
        # ... and the culprit joins their batch: it fails at its second token, while they have 12 to go
        bad = [pool.submit(post, server, "/v1/completions", culprit) for _ in range(2)]
        rejected = pool.submit(post, server, "/v1/completions", {**COMPLETION, "seed": 2**64})
        together = [s.result() for s in streams]
    assert together == alone and all((reason, n) == ("length", 12) for _, reason, n in together)
    for response in bad:
        error = openai_error(response.result(), 500)
        assert error["code"] == "generation_failed" and "Overflow" in error["message"]
    assert openai_error(rejected.result(), 400)["param"] == "seed"
    assert httpx.get(server.base_url + "/healthz").status_code == 200


def test_an_engine_failing_every_step_turns_health_and_readiness_red(
    server: RunningWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(server.worker.engine.runner, "run", broken)
    for _ in range(server.worker.loop.max_failed_iterations):
        assert httpx.get(server.base_url + "/healthz").status_code == 200
        error = openai_error(post(server, "/v1/completions", COMPLETION), 503)
        assert error["code"] == "unavailable" and "illegal memory access" in error["message"]
    for probe in ("/healthz", "/readyz"):
        response = httpx.get(server.base_url + probe)
        assert response.status_code == 503 and "illegal memory access" in response.json()["reason"]
    monkeypatch.undo()  # the fault goes away: one good iteration makes the engine healthy again
    assert post(server, "/v1/completions", COMPLETION).status_code == 200
    assert httpx.get(server.base_url + "/healthz").status_code == 200
    assert httpx.get(server.base_url + "/readyz").status_code == 200


# /v1/score ----------------------------------------------------------------------------------------------


def scored(prompt: list[int], continuation: list[int]) -> Future[tuple[float, int]]:
    """The scorer's answer, at once: these tests are about what reaches it, not about scoring."""
    done: Future[tuple[float, int]] = Future()
    done.set_result((-1.5 * len(continuation), 0))
    return done


@pytest.fixture
def score_api(tiny_checkpoints: dict[str, Path], redis_client: redis.Redis) -> TestClient:
    tokenizer = ServingTokenizer.from_pretrained(tiny_checkpoints["llama"])
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(
        continual_router(
            JobStore(redis_client, JobKeys("ns", "score")),
            status=lambda: {},
            scorer=scored,
            encode_prompt=tokenizer.encode,
            encode_chat=tokenizer.apply_chat_template,
            encode_continuation=lambda text: tokenizer.inner.encode(text, add_special_tokens=False),
        )
    )
    return TestClient(app, raise_server_exceptions=False)


def score(api: TestClient, body: dict[str, Any]) -> httpx.Response:
    return api.post("/v1/score", content=json.dumps(body), headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"messages": [{"content": "hi"}], "continuation": "yes"}, "messages.0.role", None),
        ({"messages": [{"role": "wizard", "content": "hi"}], "continuation": "yes"}, "messages.0.role", None),
        ({"messages": [], "continuation": "yes"}, "messages", None),
        (
            {"messages": [{"role": "user", "content": "\ud800"}], "continuation": "yes"},
            "messages.0.content",
            "invalid_text",
        ),
        ({"prompt": "a\ud800", "continuation": "yes"}, "prompt", "invalid_text"),
        ({"prompt": "fine", "continuation": "\udfff"}, "continuation", None),  # pydantic's min_length says so
    ],
)
def test_score_rejects_malformed_messages_and_text(
    score_api: TestClient, body: dict[str, Any], param: str, code: str | None
) -> None:
    response = score(score_api, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and (code is None or error["code"] == code)


def test_score_of_a_well_formed_conversation(score_api: TestClient) -> None:
    body = {"messages": [{"role": "user", "content": "Capital of France?"}], "continuation": "Paris."}
    response = score(score_api, body)
    assert response.status_code == 200, response.text
    assert response.json()["tokens"] >= 1 and response.json()["object"] == "score"
