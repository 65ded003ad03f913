"""What training does after the gate held a version (tiny model, real Redis, in-process worker).

`revert` (the default): the next version is trained from the held version's parent, also after a restart;
`continue`: from the held version itself. Under `revert` each candidate held in a row from one version halves
the learning rate of the next (`held_backoff`), so retraining the same feedback makes a different candidate.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from alchemist_protocol.schemas import VersionInfo
from alchemist_worker.evaluation.gate import GateBounds
from alchemist_worker.evaluation.settings import EvaluationSettings, OnHeld

from tests.worker.continual.conftest import InProcessWorker, wait_until
from tests.worker.evaluation.test_gate_runtime import EVAL_SET, PROMPT

HOLD_ALL = GateBounds(0.0, 0.0, 0.0)  # any rise at all holds
PASS_ALL = GateBounds(10.0, 10.0, 1.0)


def gate(
    tmp_path: Path, bounds: GateBounds, on_held: OnHeld = OnHeld.REVERT, held_backoff: float = 0.5
) -> EvaluationSettings:
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(json.dumps(item) for item in EVAL_SET))
    return EvaluationSettings(path, bounds, on_held=on_held, held_backoff=held_backoff)


def hold(worker: InProcessWorker, version: int = 1) -> VersionInfo:
    """A high learning rate on one odd correction: `version` regresses and is held."""
    out = worker.generate(PROMPT)
    worker.feedback.correct(out.request_id, "zq zq zq zq zq zq zq zq")
    worker.wait_version(version)
    info = worker.store.get_version(version)
    assert info is not None and info.held
    return info


def train_next(worker: InProcessWorker, version: int) -> int:
    """Feedback for one more version; returns its parent."""
    return worker.accept_until(version, PROMPT).parent


def training_weights(worker: InProcessWorker) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in worker.runtime.weights.snapshot().items()}


def test_after_a_held_version_training_continues_from_its_parent(
    make_worker: Callable[..., InProcessWorker], tmp_path: Path
) -> None:
    worker = make_worker(learning_rate=5e-2, evaluation=gate(tmp_path, HOLD_ALL))
    initial = training_weights(worker)
    hold(worker)
    trainer = worker.runtime.trainer

    def undone() -> bool:  # version 1 is published (so trained) by now: only the revert brings these back
        reverted = training_weights(worker)
        return reverted.keys() == initial.keys() and all(
            torch.equal(reverted[k], initial[k]) for k in initial
        )

    wait_until(undone, 10, "the held step undone, exactly")
    assert trainer.head_version == 0 and 1 not in trainer.lineage
    assert train_next(worker, 2) == 0


def test_continue_trains_on_from_the_held_version(
    make_worker: Callable[..., InProcessWorker], tmp_path: Path
) -> None:
    worker = make_worker(learning_rate=5e-2, evaluation=gate(tmp_path, HOLD_ALL, OnHeld.CONTINUE))
    hold(worker)
    wait_until(lambda: worker.runtime.trainer.head_version == 1, 10, "the trainer on the held version")
    assert train_next(worker, 2) == 1


def test_a_restarted_trainer_does_not_build_on_a_held_head(
    make_worker: Callable[..., InProcessWorker], tmp_path: Path
) -> None:
    first = make_worker(learning_rate=5e-2, evaluation=gate(tmp_path, HOLD_ALL))
    hold(first)
    first.stop()
    # A new process (same Redis, same versions directory) finds version 1 at the head of the lineage.
    second = make_worker(learning_rate=5e-2, evaluation=gate(tmp_path, PASS_ALL))
    wait_until(lambda: second.runtime.control.training, 30, "the new trainer")
    assert second.runtime.trainer.head_version == 0
    assert train_next(second, 2) == 0


def learning_rates(worker: InProcessWorker, version: int) -> list[float]:
    info = worker.store.get_version(version)
    assert info is not None
    return [float(lr) for lr in info.training["learning_rates"]]


def test_each_hold_in_a_row_scales_the_retrain_learning_rate(
    make_worker: Callable[..., InProcessWorker], tmp_path: Path
) -> None:
    lr = 5e-2
    worker = make_worker(learning_rate=lr, evaluation=gate(tmp_path, HOLD_ALL, held_backoff=0.25))
    hold(worker)
    assert learning_rates(worker, 1) == [pytest.approx(lr)]
    for version, holds_before in ((2, 1), (3, 2)):
        assert hold(worker, version).parent == 0
        assert learning_rates(worker, version) == [pytest.approx(lr * 0.25**holds_before)]
    gauge = worker.runtime.metrics.registry.get_sample_value("alchemist_training_learning_rate")
    assert gauge == pytest.approx(lr * 0.25**2)
    worker.stop()
    # A new process reads the three holds from the published versions; a passed version starts afresh.
    second = make_worker(learning_rate=lr, evaluation=gate(tmp_path, PASS_ALL, held_backoff=0.25))
    wait_until(lambda: second.runtime.control.training, 30, "the new trainer")
    assert second.accept_until(4, PROMPT).parent == 0
    assert learning_rates(second, 4) == [pytest.approx(lr * 0.25**3)]
    assert second.accept_until(5, PROMPT).parent == 4
    assert learning_rates(second, 5) == [pytest.approx(lr)]


def test_continue_keeps_the_learning_rate(
    make_worker: Callable[..., InProcessWorker], tmp_path: Path
) -> None:
    worker = make_worker(learning_rate=5e-2, evaluation=gate(tmp_path, HOLD_ALL, OnHeld.CONTINUE))
    hold(worker)
    assert worker.accept_until(2, PROMPT).parent == 1
    assert learning_rates(worker, 2) == [pytest.approx(5e-2)]


@pytest.mark.parametrize("on_held", ["revert", "continue"])
def test_the_policy_is_read_from_the_environment(on_held: str) -> None:
    settings = EvaluationSettings.from_env({"ALCHEMIST_EVALUATION_ON_HELD": on_held.upper()})
    assert settings.on_held is OnHeld(on_held)


def test_an_unknown_policy_names_the_variable() -> None:
    with pytest.raises(ValueError, match="ALCHEMIST_EVALUATION_ON_HELD='rewind'"):
        EvaluationSettings.from_env({"ALCHEMIST_EVALUATION_ON_HELD": "rewind"})


@pytest.mark.parametrize("raw", ["0", "1.5", "-0.5", "half", "nan", "inf", "1e400", "\x00"])
def test_a_backoff_outside_0_to_1_names_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match="ALCHEMIST_EVALUATION_HELD_BACKOFF"):
        EvaluationSettings.from_env({"ALCHEMIST_EVALUATION_HELD_BACKOFF": raw})


def test_the_backoff_is_read_from_the_environment() -> None:
    assert EvaluationSettings.from_env({}).held_backoff == 0.5
    assert EvaluationSettings.from_env({"ALCHEMIST_EVALUATION_HELD_BACKOFF": "1"}).held_backoff == 1.0
