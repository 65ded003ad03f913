"""Rehearsal of earlier accepted answers: the buffer alone, and inside the trainer (tiny model, real Redis)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

import pytest
from alchemist_worker.continual.rehearsal import RehearsalBuffer, RehearsalEntry
from alchemist_worker.continual.settings import TrainerSettings

from tests.worker.continual.conftest import InProcessWorker, wait_until
from tests.worker.evaluation.test_held_versions import HOLD_ALL, gate, hold

PROMPT = [1, 5, 9, 13, 17]


def entry(i: int) -> RehearsalEntry:
    return RehearsalEntry(f"f{i}", (1, i), (i, 2))


def test_the_buffer_is_a_bounded_uniform_sample_of_everything_offered() -> None:
    buffer = RehearsalBuffer(capacity=100)
    buffer.add(entry(i) for i in range(50))
    assert [e.feedback_id for e in buffer.entries] == [f"f{i}" for i in range(50)]  # room for all
    buffer.add(entry(i) for i in range(50, 5000))
    assert len(buffer) == 100 and buffer.seen == 5000
    kept = [int(e.feedback_id[1:]) for e in buffer.entries]
    assert len(set(kept)) == 100
    # Uniform over 0..4999: the mean is near 2500 (its sd over 100 draws is about 144) and old ones survive.
    assert abs(statistics.mean(kept) - 2500) < 600
    assert sum(k < 2500 for k in kept) >= 30


def test_draws_are_distinct_and_reproducible_from_the_state() -> None:
    buffer = RehearsalBuffer(capacity=20)
    buffer.add(entry(i) for i in range(30))
    draw = buffer.draw(8, step=3)
    assert len({e.feedback_id for e in draw}) == 8
    copy = RehearsalBuffer(capacity=20)
    copy.load(json.loads(json.dumps(buffer.state())))  # plain values: it travels in the trainer's state
    assert copy.entries == buffer.entries and copy.seen == buffer.seen
    assert copy.draw(8, step=3) == draw
    copy.add([entry(99)])
    buffer.add([entry(99)])
    assert copy.entries == buffer.entries
    assert buffer.draw(50, step=4) and len(buffer.draw(50, step=4)) == 20
    assert RehearsalBuffer(capacity=5).draw(3, step=0) == []


def test_settings_validate_the_rehearsal() -> None:
    env = {"ALCHEMIST_TRAINING_REHEARSAL_SAMPLES": "4", "ALCHEMIST_TRAINING_REHEARSAL_CAPACITY": "64"}
    settings = TrainerSettings.from_env(env)
    assert (settings.rehearsal_samples, settings.rehearsal_capacity) == (4, 64)
    with pytest.raises(ValueError, match="rehearsal_capacity"):
        TrainerSettings(rehearsal_capacity=0)
    with pytest.raises(ValueError, match="rehearsal_samples"):
        TrainerSettings(rehearsal_samples=-1)


def accept_one(worker: InProcessWorker, version: int) -> dict[str, object]:
    return worker.accept_until(version, PROMPT).training


def test_each_step_rehearses_answers_of_earlier_versions_and_a_restart_keeps_them(
    make_worker: Callable[..., InProcessWorker],
) -> None:
    worker = make_worker(rehearsal_samples=2)
    assert accept_one(worker, 1)["rehearsed"] == 0  # nothing to rehearse yet
    assert accept_one(worker, 2)["rehearsed"] == 1  # version 1's answer
    assert accept_one(worker, 3)["rehearsed"] == 2
    trainer = worker.runtime.trainer
    wait_until(lambda: len(trainer.rehearsal) == 3, 10, "three answers in the buffer")
    kept = list(trainer.rehearsal.entries)
    worker.stop()
    again = make_worker(rehearsal_samples=2)
    wait_until(lambda: again.runtime.control.training, 30, "the new trainer")
    assert again.runtime.trainer.rehearsal.entries == kept  # from version 3's state, with its own answer


def test_answers_of_a_held_version_are_never_rehearsed(
    make_worker: Callable[..., InProcessWorker], tmp_path: Path
) -> None:
    worker = make_worker(rehearsal_samples=2, learning_rate=5e-2, evaluation=gate(tmp_path, HOLD_ALL))
    hold(worker)
    second = worker.accept_until(2, PROMPT)
    assert second.training["rehearsed"] == 0  # the buffer was empty: version 1's answer never entered
    # Only version 2's own answer, and only if the gate passed it.
    assert len(worker.runtime.trainer.rehearsal) == (0 if second.held else 1)
