"""Request and response ids in the worker's JSON log lines, against a real worker."""

import io
import json
import logging
from collections.abc import Iterator

import httpx
import pytest
from alchemist_protocol.log_format import JsonFormatter
from alchemist_worker.api.request_log import usable_request_id

from tests.worker.api.conftest import RunningWorker


@pytest.fixture
def access_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("alchemist_worker.access")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_completion_logs_its_request_and_response_id(
    tiny_server: RunningWorker, access_lines: io.StringIO
) -> None:
    reply = httpx.post(
        tiny_server.base_url + "/v1/completions",
        json={"model": tiny_server.model, "prompt": "hello", "max_tokens": 2},
        headers={"X-Request-ID": "trace-abc"},
        timeout=30,
    )
    assert reply.status_code == 200
    assert reply.headers["x-request-id"] == "trace-abc"
    (line,) = [e for e in _lines(access_lines) if e.get("request_id") == "trace-abc"]
    assert line["response_id"] == reply.json()["id"]
    assert line["status"] == 200 and line["message"] == "POST /v1/completions 200"


def test_refused_requests_get_a_fresh_id_and_probes_log_nothing(
    tiny_server: RunningWorker, access_lines: io.StringIO
) -> None:
    bad = httpx.post(
        tiny_server.base_url + "/v1/completions",
        json={"model": "nope", "prompt": "hello"},
        headers={"X-Request-ID": "has space"},
        timeout=30,
    )
    assert bad.status_code == 404
    generated = bad.headers["x-request-id"]
    assert generated.startswith("req-")
    assert httpx.get(tiny_server.base_url + "/healthz", timeout=10).status_code == 200
    lines = _lines(access_lines)
    assert [e["request_id"] for e in lines] == [generated]
    assert "response_id" not in lines[0] and lines[0]["status"] == 404


def test_usable_request_id() -> None:
    assert usable_request_id(b"abc-123") == "abc-123"
    for raw in (None, b"", b"a b", b"x" * 200, b"\xff\xfe", b"tab\there"):
        assert usable_request_id(raw) is None
