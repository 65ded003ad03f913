"""The continual trainer inside a serving process (tiny model, real Redis): feedback in, versions out."""

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import torch
from alchemist_protocol.keys import FEEDBACK_GROUP
from alchemist_protocol.schemas import RolloutPointer
from alchemist_worker.model.attention import DenseCausalAttention
from alchemist_worker.rollout.follower import FollowMode
from alchemist_worker.versions.artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINER_STATE

from tests.worker.continual.conftest import KEYS, InProcessWorker, wait_until

PROMPT = [1, 5, 9, 13, 17]


def pending(client: redis.Redis) -> int:
    return int(client.xpending(KEYS.feedback, FEEDBACK_GROUP)["pending"])


def samples_metric(worker: InProcessWorker, path: str) -> float:
    total = 0.0
    for metric in worker.runtime.metrics.samples.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("path") == path:
                total += sample.value
    return total


def test_feedback_becomes_a_version_that_serving_switches_to(
    make_worker: Callable[..., InProcessWorker], redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="alchemist_worker.continual.control")
    worker = make_worker(min_batch_samples=2, max_wait_s=30.0)  # the two trainable ones make one step
    outputs = [worker.generate(PROMPT[:k]) for k in (3, 4, 5)]
    correction = worker.runtime.continuation_tokens("a fix")
    before, version = worker.runtime.score(PROMPT[:4], correction)  # the prompt of outputs[1]
    assert version == 0
    worker.feedback.accept(outputs[0].request_id)
    worker.feedback.correct(outputs[1].request_id, "a fix")
    worker.feedback.reject(outputs[2].request_id)
    worker.feedback.accept("cmpl-unknown")
    worker.wait_version(1)
    worker.wait_serving(1)

    info = worker.store.get_version(1)
    assert info is not None and info.parent == 0 and info.samples == 2 and info.loss is not None
    assert info.feedback_ranges and info.trained_by == "r0"
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINER_STATE} <= {
        p.name for p in worker.runtime.directory.path(1).iterdir()
    }
    wait_until(lambda: pending(redis_client) == 0, 10, "all feedback acknowledged")
    dead = redis_client.xrange(KEYS.dead_letters)
    assert len(dead) == 1 and "no request record" in dead[0][1]["reason"]
    # Its log line carries the response id the feedback named (a field of its own in JSON logs).
    assert any(getattr(r, "response_id", None) == "cmpl-unknown" for r in caplog.records)
    assert redis_client.hgetall(KEYS.version_feedback(0)) == {
        "positive": "1",
        "correction": "1",
        "negative": "1",
    }
    assert samples_metric(worker, "reused") == 2  # both recorded here, at version 0 = the trainer's head
    # The correction was trained on (one step, high learning rate): it became more likely under version 1.
    after, version = worker.runtime.score(PROMPT[:4], correction)
    before_same, _ = before, None
    assert version == 1
    assert after > worker_score_at_base(worker, PROMPT[:4], correction, before_same)
    (replica,) = worker.store.live_replicas()
    wait_until(lambda: worker.store.live_replicas()[0].loaded_version == 1, 5, "heartbeat with version 1")
    assert replica.replica == "r0"


def worker_score_at_base(
    worker: InProcessWorker, prompt: list[int], tokens: list[int], _unused: float
) -> float:
    """The score under version 0 computed from the base serving set, without switching the engine."""
    weights = worker.runtime.weights
    serving = weights.serving

    def at_base() -> float:
        weights.install(weights.base_serving_set())
        try:
            return worker.runtime._score(prompt, tokens)[0]
        finally:
            weights.install(serving)

    return worker.runtime.engine_side.call(at_base).result(timeout=30)


def test_rollback_continues_training_from_the_older_version(
    make_worker: Callable[..., InProcessWorker],
) -> None:
    worker = make_worker()
    for expected in (1, 2):
        out = worker.generate(PROMPT)
        worker.feedback.accept(out.request_id)
        worker.wait_version(expected)
    worker.wait_serving(2)
    worker.store.request_rollback(1, reason="test")
    worker.wait_serving(1)
    wait_until(lambda: worker.runtime.trainer.head_version == 1, 10, "trainer back at version 1")
    out = worker.generate(PROMPT)  # served by version 1 after the rollback, so its record is on the lineage
    worker.feedback.accept(out.request_id)
    worker.wait_version(3)
    info = worker.store.get_version(3)
    assert info is not None and info.parent == 1
    worker.wait_serving(3)  # the trainer published past the rollback: `latest` follows again


def test_a_sample_of_an_abandoned_step_reuses_its_record_when_trained_again(
    make_worker: Callable[..., InProcessWorker],
) -> None:
    """Records are dropped when a version covers their step, not after the step: a step that never commits
    (here abandoned by a rollback; in data-parallel rounds, a round the group drops) leaves them for the
    samples' next step."""
    worker = make_worker(publish_every_steps=2)
    control = worker.runtime.control
    out = worker.generate(PROMPT)
    worker.feedback.accept(out.request_id)
    wait_until(lambda: control.status()["uncommitted_steps"] == 1, 30, "one step, not yet a version")
    worker.store.request_rollback(0, reason="abandon the step")
    wait_until(lambda: control._honoured is not None, 10, "the rollback honoured")
    worker.accept_until(1, [2, 4, 6, 8, 10])  # the abandoned sample and this one make version 1
    info = worker.store.get_version(1)
    assert info is not None and info.samples == 2
    assert (info.training["reused"], info.training["recomputed"]) == (2, 0), info.training


def test_pointer_mode_serves_what_the_operator_says(make_worker: Callable[..., InProcessWorker]) -> None:
    worker = make_worker(follow=FollowMode.POINTER)
    worker.store.set_rollout(RolloutPointer(stable_version=0))
    out = worker.generate(PROMPT)
    worker.feedback.accept(out.request_id)
    worker.wait_version(1)
    worker.generate(PROMPT)
    assert worker.engine.weight_version == 0  # published, but not rolled out
    worker.store.set_rollout(RolloutPointer(stable_version=0, canary_version=1, canary_replicas=["r0"]))
    worker.wait_serving(1)
    worker.store.set_rollout(RolloutPointer(stable_version=0))
    worker.wait_serving(0)


def test_a_second_replica_serves_but_does_not_train(
    make_worker: Callable[..., InProcessWorker], tmp_path
) -> None:  # type: ignore[no-untyped-def]
    trainer = make_worker()
    wait_until(lambda: trainer.runtime.control.training, 10, "the first replica takes the lease")
    follower = make_worker(replica="r1")
    out = follower.generate(PROMPT)  # served by r1: the trainer cannot reuse its record, it recomputes
    follower.feedback.accept(out.request_id)
    trainer.wait_version(1)
    follower.wait_serving(1)
    assert not follower.runtime.control.training
    assert samples_metric(trainer, "recomputed") == 1
    reasons = {
        s.labels["reason"]
        for m in trainer.runtime.metrics.samples.collect()
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert reasons == {"other_replica"}


@pytest.mark.parametrize("method", ["full"])
def test_full_fine_tuning_publishes_safetensors(
    make_worker: Callable[..., InProcessWorker], method: str
) -> None:
    worker = make_worker(method=method, learning_rate=1e-4)
    out = worker.generate(PROMPT)
    worker.feedback.accept(out.request_id)
    worker.wait_version(1)
    worker.wait_serving(1)
    files = {p.name for p in worker.runtime.directory.path(1).iterdir()}
    assert {"model.safetensors", "config.json"} <= files


def test_a_published_version_loads_in_peft_and_matches_what_the_worker_serves(
    make_worker: Callable[..., InProcessWorker], tiny_checkpoints: dict[str, Path]
) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    worker = make_worker(learning_rate=2e-2, min_batch_samples=2, max_wait_s=30.0)
    for prompt in (PROMPT, PROMPT[:3]):
        out = worker.generate(prompt)
        worker.feedback.correct(out.request_id, "some better answer")
    worker.wait_version(1)
    worker.wait_serving(1)
    ids = [1, 7, 11, 13, 2, 5]

    def native() -> torch.Tensor:
        model = worker.engine.runner.model
        with torch.inference_mode():
            hidden = model(torch.tensor(ids), torch.arange(len(ids)), DenseCausalAttention([0, len(ids)]))
            return model.compute_logits(hidden)

    served = worker.runtime.engine_side.call(native).result(timeout=30)
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32)
    plain = base(input_ids=torch.tensor([ids])).logits[0].detach()
    tuned = peft.PeftModel.from_pretrained(base, worker.runtime.directory.path(1))
    with torch.no_grad():
        reference = tuned(input_ids=torch.tensor([ids])).logits[0]
    assert (served - reference).abs().max() < 1e-4
    assert (served - plain).abs().max() > 1e-3  # the version differs from the base model


def test_the_saved_trainer_state_is_a_copy(make_worker: Callable[..., InProcessWorker]) -> None:
    worker = make_worker()
    out = worker.generate(PROMPT)
    worker.feedback.accept(out.request_id)
    worker.wait_version(1)
    trainer = worker.runtime.trainer
    state = worker.runtime.engine_side.call(trainer.state_dict).result()
    moments = state["optimizer"]["state"][0]["exp_avg"]
    live = trainer.optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(moments, live) and moments.data_ptr() != live.data_ptr()
