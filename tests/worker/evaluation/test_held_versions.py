"""What training does after the gate held a version (tiny model, real Redis, in-process worker).

`revert` (the default): the next version is trained from the held version's parent, also after a restart;
`continue`: from the held version itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from alchemist_worker.evaluation.gate import GateBounds
from alchemist_worker.evaluation.settings import EvaluationSettings, OnHeld

from tests.worker.continual.conftest import InProcessWorker, wait_until
from tests.worker.evaluation.test_gate_runtime import EVAL_SET, PROMPT

HOLD_ALL = GateBounds(0.0, 0.0, 0.0)  # any rise at all holds
PASS_ALL = GateBounds(10.0, 10.0, 1.0)


def gate(tmp_path: Path, bounds: GateBounds, on_held: OnHeld = OnHeld.REVERT) -> EvaluationSettings:
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(json.dumps(item) for item in EVAL_SET))
    return EvaluationSettings(path, bounds, on_held=on_held)


def hold_first_version(worker: InProcessWorker) -> None:
    """A high learning rate on one odd correction: version 1 regresses and is held."""
    out = worker.generate(PROMPT)
    worker.feedback.correct(out.request_id, "zq zq zq zq zq zq zq zq")
    worker.wait_version(1)
    info = worker.store.get_version(1)
    assert info is not None and info.held


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
    hold_first_version(worker)
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
    hold_first_version(worker)
    wait_until(lambda: worker.runtime.trainer.head_version == 1, 10, "the trainer on the held version")
    assert train_next(worker, 2) == 1


def test_a_restarted_trainer_does_not_build_on_a_held_head(
    make_worker: Callable[..., InProcessWorker], tmp_path: Path
) -> None:
    first = make_worker(learning_rate=5e-2, evaluation=gate(tmp_path, HOLD_ALL))
    hold_first_version(first)
    first.stop()
    # A new process (same Redis, same versions directory) finds version 1 at the head of the lineage.
    second = make_worker(learning_rate=5e-2, evaluation=gate(tmp_path, PASS_ALL))
    wait_until(lambda: second.runtime.control.training, 30, "the new trainer")
    assert second.runtime.trainer.head_version == 0
    assert train_next(second, 2) == 0


@pytest.mark.parametrize("on_held", ["revert", "continue"])
def test_the_policy_is_read_from_the_environment(on_held: str) -> None:
    settings = EvaluationSettings.from_env({"ALCHEMIST_EVALUATION_ON_HELD": on_held.upper()})
    assert settings.on_held is OnHeld(on_held)


def test_an_unknown_policy_names_the_variable() -> None:
    with pytest.raises(ValueError, match="ALCHEMIST_EVALUATION_ON_HELD='rewind'"):
        EvaluationSettings.from_env({"ALCHEMIST_EVALUATION_ON_HELD": "rewind"})
