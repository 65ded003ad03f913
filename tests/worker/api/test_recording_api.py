"""Recording through the API: opt-in and opt-out per request, records keyed by the response id, Redis records."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import JobKeys

from tests.worker.api.conftest import RunningWorker, start_worker


@pytest.fixture
def recording_server(tiny_checkpoints: dict[str, Path], redis_url: str) -> Iterator[RunningWorker]:
    running = start_worker(
        tiny_checkpoints["qwen3"],
        "--served-model-name", "tiny", "--max-model-len", "128", "--kv-cache-mib", "8",
        "--record-policy", "selective", "--record-rate", "0", "--redis-url", redis_url,
        "--namespace", "ns", "--job", "job", "--replica", "replica-0", "--request-ttl-s", "600",
        "--weight-version", "4",
    )  # fmt: skip
    yield running
    running.stop()


def wait_for_request(store: JobStore, request_id: str) -> None:
    deadline = time.monotonic() + 10
    while store.get_request(request_id) is None:
        assert time.monotonic() < deadline, f"no Redis record for {request_id}"
        time.sleep(0.02)


def test_opt_in_records_and_every_answer_goes_to_redis(
    recording_server: RunningWorker, redis_client: redis.Redis
) -> None:
    client = recording_server.client()
    messages = [{"role": "user", "content": "remember this"}]
    opted_in = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=5,
        extra_body={"record": True},  # type: ignore[arg-type]
    )
    sampled_out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5)  # type: ignore[arg-type]
    assert opted_in.model_extra is not None and sampled_out.model_extra is not None
    assert opted_in.model_extra["alchemist"] == {"weight_version": 4, "recorded": True}
    assert sampled_out.model_extra["alchemist"] == {"weight_version": 4, "recorded": False}

    recording = recording_server.worker.engine.recording
    assert recording is not None
    store = recording.store  # type: ignore[attr-defined]
    assert opted_in.id in store and sampled_out.id not in store
    assert store.get(opted_in.id).version == 4

    jobs = JobStore(redis_client, JobKeys("ns", "job"))
    for response, recorded in ((opted_in, True), (sampled_out, False)):
        wait_for_request(jobs, response.id)
        record = jobs.get_request(response.id)
        assert record is not None and response.usage is not None
        assert len(record.prompt_tokens) == response.usage.prompt_tokens
        assert len(record.response_tokens) == response.usage.completion_tokens
        assert (record.replica, record.version, record.model, record.recorded) == (
            "replica-0",
            4,
            "tiny",
            recorded,
        )
        assert 0 < redis_client.ttl(JobKeys("ns", "job").request(response.id)) <= 600
    if store.get(opted_in.id) is not None:
        assert store.get(opted_in.id).token_ids.tolist() == jobs.get_request(opted_in.id).prompt_tokens  # type: ignore[union-attr]

    # Gauges come from the engine loop's statistics snapshot, refreshed a few times a second.
    deadline = time.monotonic() + 5
    while recorded_device_bytes(recording_server) <= 0:
        assert time.monotonic() < deadline, "recorded bytes never reached the metrics"
        time.sleep(0.05)


def recorded_device_bytes(server: RunningWorker) -> float:
    for line in httpx.get(server.base_url + "/metrics").text.splitlines():
        if line.startswith('alchemist_recorded_bytes{tier="device"}'):
            return float(line.split()[-1])
    return 0.0


def test_redis_outage_does_not_break_serving(recording_server: RunningWorker, redis_server: object) -> None:
    redis_server.kill()  # type: ignore[attr-defined]
    try:
        result = recording_server.client().completions.create(model="tiny", prompt="still here", max_tokens=3)
        assert result.choices[0].finish_reason in ("length", "stop")
        deadline = time.monotonic() + 10
        while (
            "alchemist_request_record_write_failures_total 1.0"
            not in httpx.get(recording_server.base_url + "/metrics").text
        ):
            assert time.monotonic() < deadline, "the failed write was not counted"
            time.sleep(0.05)
    finally:
        redis_server.start()  # type: ignore[attr-defined]
