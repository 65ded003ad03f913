"""The evaluation gate inside a serving process (tiny model, real Redis): a held version is never served.

The trainer scores each candidate before publishing it; the reading is published with the version, shown by
/v1/versions and the metrics, and a `latest`-following replica keeps serving the newest version that passed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alchemist_protocol.schemas import GateDecision
from alchemist_worker.api.errors import install_error_handlers
from alchemist_worker.continual.router import continual_router
from alchemist_worker.continual.runtime import RuntimeSettings
from alchemist_worker.evaluation.candidate import CandidateEvaluation
from alchemist_worker.evaluation.gate import GateBounds
from alchemist_worker.evaluation.settings import EvaluationSettings
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.worker.continual.conftest import InProcessWorker, wait_until

PROMPT = [1, 5, 9, 13, 17]
EVAL_SET = [
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"text": "Kubernetes operators reconcile custom resources into pods, services and config maps."},
    {"prompt": "Redis streams queue feedback;", "reference": " consumer groups deliver each entry"},
]


def attach_gate(worker: InProcessWorker, tmp_path: Path, bounds: GateBounds) -> None:
    """Gives a started worker an evaluation set (no step has run yet: none starts without feedback)."""
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(json.dumps(item) for item in EVAL_SET))
    runtime = worker.runtime
    runtime.trainer.evaluation = CandidateEvaluation.load(
        EvaluationSettings(path, bounds),
        runtime._encode_text,
        runtime.engine.tokenizer.apply_chat_template,
        runtime.engine.max_model_len,
        runtime.gate_metrics,
    )


def decisions(worker: InProcessWorker) -> dict[str, float]:
    out = {}
    for metric in worker.runtime.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "alchemist_evaluation_gate_decisions_total":
                out[sample.labels["decision"]] = sample.value
    return out


def versions_route(worker: InProcessWorker) -> dict[str, Any]:
    runtime = worker.runtime
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(
        continual_router(
            runtime.store,
            runtime.control.status,
            runtime.submit_score,
            encode_prompt=lambda text: [1],
            encode_chat=lambda messages: [1],
            encode_continuation=lambda text: [2],
        )
    )
    response = TestClient(app).get("/v1/versions")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def test_a_regressing_version_is_published_held_and_never_served(
    make_worker: Callable[..., InProcessWorker], tmp_path: Path
) -> None:
    # Any rise at all holds, and a high learning rate on one odd correction moves everything else.
    worker = make_worker(learning_rate=5e-2)
    attach_gate(worker, tmp_path, GateBounds(0.0, 0.0, 0.0))
    out = worker.generate(PROMPT)
    worker.feedback.correct(out.request_id, "zq zq zq zq zq zq zq zq")
    worker.wait_version(1)

    info = worker.store.get_version(1)
    assert info is not None and info.evaluation is not None
    reading = info.evaluation
    assert reading.decision is GateDecision.HELD and info.held
    assert any("above base v0" in reason for reason in reading.reasons), reading.reasons
    assert reading.parent == 0 and reading.parent_scores == reading.base
    assert reading.base.perplexity is not None and reading.scores.perplexity is not None
    assert reading.scores.reference_items == 1 and reading.base.text_tokens == reading.scores.text_tokens > 0
    assert worker.store.latest_servable_version() == 0
    time.sleep(0.5)  # ten follow intervals: a `latest` follower would have switched long ago
    assert worker.engine.weight_version == 0
    assert worker.runtime.directory.path(1).is_dir()  # published and kept: a person may still roll it out

    body = versions_route(worker)
    assert body["held"] == [1]
    assert body["data"][0]["evaluation"]["decision"] == "held"
    assert body["data"][0]["evaluation"]["reasons"] == reading.reasons
    assert decisions(worker) == {"held": 1.0}


def test_passing_versions_are_served_and_judged_against_their_parent(
    make_worker: Callable[..., InProcessWorker], tmp_path: Path
) -> None:
    worker = make_worker()
    attach_gate(worker, tmp_path, GateBounds(10.0, 10.0, 1.0))
    for expected in (1, 2):
        out = worker.generate(PROMPT)
        worker.feedback.accept(out.request_id)
        worker.wait_version(expected)
        worker.wait_serving(expected)
    first, second = worker.store.get_version(1), worker.store.get_version(2)
    assert first is not None and second is not None
    assert first.evaluation is not None and second.evaluation is not None
    assert second.evaluation.decision is GateDecision.PASSED and second.evaluation.parent == 1
    assert second.evaluation.parent_scores == first.evaluation.scores
    assert second.evaluation.base == first.evaluation.base  # the base is scored once per process
    assert first.evaluation.scores != first.evaluation.base  # the candidate, not the base, was scored
    assert versions_route(worker)["held"] == []
    wait_until(lambda: decisions(worker) == {"passed": 2.0}, 5, "two passed decisions")


def test_runtime_settings_read_the_evaluation_set_from_the_environment(tmp_path: Path) -> None:
    env = {"ALCHEMIST_EVALUATION_SET": "/sets/eval.jsonl", "ALCHEMIST_EVALUATION_MAX_EXACT_MATCH_DROP": "0.2"}
    settings = RuntimeSettings.from_env(
        env, redis_url="redis://x", namespace="ns", job="job", replica="r0", versions_dir=tmp_path
    )
    assert settings.evaluation.path == Path("/sets/eval.jsonl")
    assert settings.evaluation.bounds.max_exact_match_drop == 0.2
