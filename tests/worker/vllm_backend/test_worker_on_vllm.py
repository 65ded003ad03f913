"""The whole loop through the worker's HTTP API on the vLLM engine, driven by the official openai client.

The main job's scripted application (users ask, accept, reject and correct through `/v1/feedback`) runs
against `alchemist-worker serve --engine vllm`: the worker serves through vLLM, records at prefill, trains on
the feedback reusing those records, publishes versions and serves them, and the corrected answer becomes more
likely. The same test runs on the native engine in tests/worker/demo.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from alchemist_worker.demo.scenario import Scenario, run_scenario

from tests.worker.continual.worker_process import WorkerProcess

pytestmark = pytest.mark.slow


def test_serve_feedback_train_publish_and_serve_the_new_version(
    tiny_checkpoints: dict[str, Path], redis_url: str, tmp_path: Path
) -> None:
    worker = WorkerProcess(
        tiny_checkpoints["llama"],
        redis_url,
        tmp_path / "versions",
        tmp_path / "worker.log",
        ALCHEMIST_ENGINE="vllm",
        ALCHEMIST_VLLM_COMPILE="false",
        ALCHEMIST_SERVED_MODEL_NAME="smollm2",
        ALCHEMIST_TRAINING_LEARNING_RATE="0.01",
        ALCHEMIST_MAX_MODEL_LEN="256",
        ALCHEMIST_KV_CACHE_MIB="32",
    ).start(timeout=180)
    try:
        summary = run_scenario(worker.base_url, Scenario(rounds=2, max_tokens=4, settle_timeout_s=120), print)
    finally:
        worker.stop()
    log = (tmp_path / "worker.log").read_text()
    assert "with the vllm engine" in log
    assert summary["first_version"] == 0 and summary["last_version"] >= 2
    assert summary["reused"] > 0  # trained on records made inside vLLM's prefill
    assert [v["version"] for v in summary["versions"]] == list(range(1, summary["last_version"] + 1))
    assert summary["logprob_after"]["logprob"] > summary["logprob_before"]["logprob"]
