from pathlib import Path

import pytest
import torch
from alchemist_worker.continual.settings import ENV, Method, Schedule, TrainerSettings


def test_settings_read_the_environment_and_overrides_win() -> None:
    env = {
        "ALCHEMIST_TRAINING_METHOD": "full",
        "ALCHEMIST_TRAINING_LEARNING_RATE": "3e-5",
        "ALCHEMIST_TRAINING_LORA_TARGET_MODULES": "q_proj, v_proj",
        "ALCHEMIST_TRAINING_LR_SCHEDULE": "cosine",
        "ALCHEMIST_TRAINING_ENABLED": "false",
        "ALCHEMIST_TRAINING_BATCH_SIZE": "",
    }
    s = TrainerSettings.from_env(env, batch_tokens=512)
    assert s.method is Method.FULL and s.learning_rate == 3e-5 and s.schedule is Schedule.COSINE
    assert s.lora_target_modules == ("q_proj", "v_proj") and not s.enabled
    assert s.batch_tokens == 512 and s.batch_samples == TrainerSettings().batch_samples
    assert s.describe()["lora_target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ALCHEMIST_TRAINING_BATCH_SIZE": "zero"}, "ALCHEMIST_TRAINING_BATCH_SIZE"),
        ({"ALCHEMIST_TRAINING_METHOD": "qlora"}, "ALCHEMIST_TRAINING_METHOD"),
        ({"ALCHEMIST_TRAINING_ENABLED": "maybe"}, "true or false"),
        ({"ALCHEMIST_TRAINING_LEARNING_RATE": "-1"}, "learning_rate must be positive"),
        ({"ALCHEMIST_TRAINING_MIN_BATCH_SIZE": "9"}, "cannot exceed batch_samples"),
        ({"ALCHEMIST_TRAINING_LORA_DROPOUT": "0.1"}, "dropout"),
    ],
)
def test_bad_settings_say_what_to_fix(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainerSettings.from_env(env)


def test_environment_names_match_the_operator() -> None:
    from dataclasses import fields

    assert {f.name for f in fields(TrainerSettings)} == set(ENV)
    # The names the operator writes (operator/alchemist_operator/worker_env.py).
    for name, var in {
        "lora_rank": "ALCHEMIST_TRAINING_LORA_RANK",
        "learning_rate": "ALCHEMIST_TRAINING_LEARNING_RATE",
        "batch_samples": "ALCHEMIST_TRAINING_BATCH_SIZE",
        "max_staleness": "ALCHEMIST_TRAINING_MAX_STALENESS",
        "step_interval_s": "ALCHEMIST_TRAINING_STEP_INTERVAL_SECONDS",
        "publish_every_steps": "ALCHEMIST_TRAINING_PUBLISH_EVERY_STEPS",
        "train_embeddings": "ALCHEMIST_TRAINING_TRAIN_EMBEDDINGS",
        "mode": "ALCHEMIST_TRAINING_MODE",
    }.items():
        assert ENV[name] == var


def test_truncated_mode_is_refused_not_substituted(tiny_checkpoints: dict[str, Path]) -> None:
    from alchemist_worker.activations.store import ActivationStore, StoreConfig
    from alchemist_worker.continual.settings import Mode
    from alchemist_worker.continual.trainable_weights import TrainableWeights
    from alchemist_worker.continual.trainer import ContinualTrainer
    from alchemist_worker.model.checkpoint import load_model

    model = load_model(tiny_checkpoints["llama"], dtype=torch.float32, device=torch.device("cpu"))
    settings = TrainerSettings(mode=Mode.TRUNCATED)
    with pytest.raises(ValueError, match="truncated"):
        ContinualTrainer(
            model, TrainableWeights(model, settings), ActivationStore(StoreConfig()), settings, "r0"
        )


def test_objective_settings_come_from_the_operator_names_and_bad_ones_are_refused() -> None:
    from alchemist_worker.training.objectives import Objective, ObjectiveConfig

    env = {
        "ALCHEMIST_TRAINING_OBJECTIVE": "KTO",
        "ALCHEMIST_TRAINING_BETA": "0.25",
        "ALCHEMIST_TRAINING_UNDESIRABLE_WEIGHT": "0.5",
        "ALCHEMIST_TRAINING_KL_WEIGHT": "0.05",
    }
    s = TrainerSettings.from_env(env)
    assert s.objective is Objective.KTO
    assert s.objective_config() == ObjectiveConfig(beta=0.25, undesirable_weight=0.5, kl_weight=0.05)
    assert s.describe()["objective"] == "kto"
    with pytest.raises(ValueError, match="ALCHEMIST_TRAINING_OBJECTIVE='rlhf'"):
        TrainerSettings.from_env({"ALCHEMIST_TRAINING_OBJECTIVE": "rlhf"})
    with pytest.raises(ValueError, match="beta must be positive"):
        TrainerSettings.from_env({"ALCHEMIST_TRAINING_BETA": "0"})
    with pytest.raises(ValueError, match="kl_weight must be a finite number >= 0"):
        TrainerSettings.from_env({"ALCHEMIST_TRAINING_KL_WEIGHT": "-1"})
