"""Training hyper-parameters the operator changes reach a running trainer through Redis, without a restart."""

import logging
import time
from collections.abc import Callable

import pytest
import redis
from alchemist_protocol.live_settings import LiveSettings, LiveTraining, write_live_settings

from tests.worker.continual.conftest import KEYS, InProcessWorker, wait_until

PROMPT = [1, 5, 9, 13, 17]


def live(**changes: float) -> LiveSettings:
    values: dict[str, float] = {
        "learning_rate": 5e-3,
        "weight_decay": 0.0,
        "batch_samples": 8,
        "max_staleness": 4,
        "step_interval_s": 0.0,
        "publish_every_steps": 1,
    }
    return LiveSettings(training=LiveTraining.model_validate(values | changes))


def test_the_next_step_uses_the_new_learning_rate_and_its_version_records_it(
    make_worker: Callable[..., InProcessWorker], redis_client: redis.Redis
) -> None:
    worker = make_worker()
    first = worker.generate(PROMPT)
    worker.feedback.accept(first.request_id)
    worker.wait_version(1)
    info = worker.store.get_version(1)
    assert info is not None and info.training["learning_rate"] == 5e-3

    assert write_live_settings(redis_client, KEYS, live(learning_rate=0.0123, weight_decay=0.01))
    control = worker.runtime.control
    wait_until(lambda: control.settings.learning_rate == 0.0123, 10, "the new learning rate applied")
    second = worker.generate(PROMPT)
    worker.feedback.accept(second.request_id)
    worker.wait_version(2)
    info = worker.store.get_version(2)
    assert info is not None and info.parent == 1
    assert info.training["learning_rate"] == 0.0123 and info.training["weight_decay"] == 0.01
    (group,) = worker.runtime.trainer.optimizer.param_groups  # what the optimizer stepped with
    assert group["lr"] == pytest.approx(0.0123) and group["weight_decay"] == 0.01


def test_values_the_worker_cannot_take_are_refused_and_it_stays_ready(
    make_worker: Callable[..., InProcessWorker],
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = make_worker(min_batch_samples=2, batch_samples=4)
    caplog.set_level(logging.INFO, logger="alchemist_worker.continual.control")
    write_live_settings(redis_client, KEYS, live(batch_samples=1, learning_rate=0.02))
    wait_until(lambda: "live settings not applied" in caplog.text, 10, "the refusal")
    control = worker.runtime.control
    assert control.settings.batch_samples == 4 and control.settings.learning_rate == 5e-3
    assert worker.runtime.control.duties.problem() is None  # not a failing duty: readiness is untouched

    write_live_settings(redis_client, KEYS, live(batch_samples=3, learning_rate=0.02))
    wait_until(lambda: control.settings.batch_samples == 3, 10, "the valid settings applied")
    assert control.settings.learning_rate == 0.02
    assert caplog.text.count("live settings not applied") == 1  # reported once, not at every read

    redis_client.set(KEYS.live_settings, "{not json")
    wait_until(lambda: "unreadable live settings" in caplog.text, 10, "the unreadable value reported")
    time.sleep(0.5)  # ten more reads at the tests' 0.05 s interval
    assert control.settings.batch_samples == 3 and caplog.text.count("unreadable live settings") == 1
