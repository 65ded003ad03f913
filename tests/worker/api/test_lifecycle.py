"""Client disconnects cancel requests; draining finishes in-flight work and refuses new work."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.worker.api.conftest import RunningWorker, start_worker

STEP_DELAY_S = 0.02  # slows every engine iteration so that requests are surely in flight


@pytest.fixture
def slow_server(tiny_checkpoints: dict[str, Path]) -> Iterator[RunningWorker]:
    running = start_worker(
        tiny_checkpoints["qwen2"],
        "--served-model-name", "tiny", "--max-model-len", "256", "--kv-cache-mib", "8", "--shutdown-timeout-s", "20",
    )  # fmt: skip
    running.worker.loop.add_between_iterations(lambda: time.sleep(STEP_DELAY_S))
    yield running
    running.stop()


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def finished_count(server: RunningWorker, reason: str) -> float:
    for line in httpx.get(server.base_url + "/metrics").text.splitlines():
        if line.startswith(f'alchemist_requests_total{{finish_reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def engine_idle(server: RunningWorker) -> bool:
    stats = server.worker.loop.stats
    return stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_blocks_used == 0


LONG = {"max_tokens": 200, "temperature": 0.0, "extra_body": {"ignore_eos": True}}


def test_stream_disconnect_aborts_the_request(slow_server: RunningWorker) -> None:
    stream = slow_server.client().completions.create(model="tiny", prompt="abort me", stream=True, **LONG)
    next(iter(stream))
    wait_for(lambda: slow_server.worker.loop.stats.num_running == 1)
    stream.close()
    wait_for(lambda: finished_count(slow_server, "abort") == 1)
    wait_for(lambda: engine_idle(slow_server))
    assert finished_count(slow_server, "length") == 0


def test_non_streaming_disconnect_aborts_the_request(slow_server: RunningWorker) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            slow_server.base_url + "/v1/completions",
            json={"model": "tiny", "prompt": "abort me too", "max_tokens": 200, "ignore_eos": True},
            timeout=0.5,
        )
    wait_for(lambda: finished_count(slow_server, "abort") == 1)
    wait_for(lambda: engine_idle(slow_server))


def test_drain_finishes_in_flight_and_refuses_new(slow_server: RunningWorker) -> None:
    client = slow_server.client()
    results: list[openai.types.Completion] = []
    thread = threading.Thread(
        target=lambda: results.append(client.completions.create(model="tiny", prompt="finish me", **LONG))
    )
    thread.start()
    wait_for(lambda: slow_server.worker.loop.stats.num_running == 1)
    slow_server.worker.server.begin_drain()  # what SIGTERM does
    assert httpx.get(slow_server.base_url + "/readyz").status_code == 503
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model="tiny", prompt="too late", max_tokens=2)
    assert err.value.status_code == 503
    thread.join(30)
    assert results and results[0].choices[0].finish_reason == "length"
    assert results[0].usage is not None and results[0].usage.completion_tokens == 200
    slow_server.thread.join(15)
    assert not slow_server.thread.is_alive()


def test_drain_deadline_aborts_what_is_left(tiny_checkpoints: dict[str, Path]) -> None:
    server = start_worker(
        tiny_checkpoints["qwen2"],
        "--served-model-name", "tiny", "--max-model-len", "256", "--kv-cache-mib", "8", "--shutdown-timeout-s", "0.3",
    )  # fmt: skip
    server.worker.loop.add_between_iterations(lambda: time.sleep(STEP_DELAY_S))
    results: list[openai.types.Completion] = []
    client = server.client()
    thread = threading.Thread(
        target=lambda: results.append(client.completions.create(model="tiny", prompt="cut me", **LONG))
    )
    thread.start()
    wait_for(lambda: server.worker.loop.stats.num_running == 1)
    started = time.monotonic()
    server.worker.server.begin_drain()
    thread.join(30)
    server.thread.join(15)
    assert not server.thread.is_alive() and time.monotonic() - started < 10
    assert results and results[0].choices[0].finish_reason == "abort"
    assert results[0].usage is not None and 0 < results[0].usage.completion_tokens < 200
