"""Objectives past `supervised` inside a serving worker (tiny model, real Redis): rejected answers train."""

from collections.abc import Callable

import pytest
import redis

from tests.worker.continual.conftest import KEYS, InProcessWorker, wait_until
from tests.worker.continual.test_runtime import pending, samples_metric, worker_score_at_base

PROMPT = [1, 5, 9, 13, 17]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["unlikelihood", "kto"])
def test_a_rejection_alone_trains_and_makes_its_answer_less_likely(
    make_worker: Callable[..., InProcessWorker], redis_client: redis.Redis, objective: str
) -> None:
    worker = make_worker(objective=objective, learning_rate=1e-2)
    output = worker.generate(PROMPT[:4])
    record = worker.store.get_request(output.request_id)
    assert record is not None
    answer = record.response_tokens
    worker.feedback.reject(output.request_id)
    worker.wait_version(1)
    info = worker.store.get_version(1)
    assert info is not None and info.samples == 1 and info.training["objective"] == objective
    wait_until(lambda: pending(redis_client) == 0, 10, "the rejection acknowledged")
    assert redis_client.hgetall(KEYS.version_feedback(0)) == {"negative": "1"}
    worker.wait_serving(1)
    after, version = worker.runtime.score(PROMPT[:4], answer)
    assert version == 1
    assert after < worker_score_at_base(worker, PROMPT[:4], answer, after) - 1e-3


@pytest.mark.slow
def test_dpo_trains_every_label_with_the_correction_paired_to_its_answer(
    make_worker: Callable[..., InProcessWorker], redis_client: redis.Redis
) -> None:
    worker = make_worker(
        objective="dpo", kl_weight=0.1, min_batch_samples=3, max_wait_s=30.0, learning_rate=1e-2
    )
    outputs = [worker.generate(PROMPT[:k]) for k in (3, 4, 5)]
    correction = worker.runtime.continuation_tokens("a fix")
    worker.feedback.accept(outputs[0].request_id)
    worker.feedback.correct(outputs[1].request_id, "a fix")
    worker.feedback.reject(outputs[2].request_id)
    worker.wait_version(1)
    info = worker.store.get_version(1)
    assert info is not None and info.samples == 3 and info.loss is not None
    assert info.training["objective"] == "dpo" and info.training["kl_weight"] == 0.1
    # All three recorded here at the trainer's head; the correction's replaced answer shares its record.
    assert samples_metric(worker, "reused") == 3
    wait_until(lambda: pending(redis_client) == 0, 10, "all feedback acknowledged")
    worker.wait_serving(1)
    after, _ = worker.runtime.score(PROMPT[:4], correction)
    assert after > worker_score_at_base(worker, PROMPT[:4], correction, after)
