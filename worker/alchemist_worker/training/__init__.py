"""Training on feedback: the exact reuse path from prefill records, the recompute path, hedging between them,
and LoRA adapters in PEFT's layout (or full fine-tuning)."""

from alchemist_worker.training.batch import TrainingSample
from alchemist_worker.training.hedging import Decision, Reason, SampleOutcome
from alchemist_worker.training.lora import (
    LoRAConfig,
    add_lora,
    enable_full_finetuning,
    load_adapter,
    load_lora_state_dict,
    lora_state_dict,
    save_adapter,
)
from alchemist_worker.training.recompute import recompute_backward, recompute_loss
from alchemist_worker.training.reuse import reuse_backward
from alchemist_worker.training.step import StepConfig, StepReport, accumulate_gradients

__all__ = [
    "Decision",
    "LoRAConfig",
    "Reason",
    "SampleOutcome",
    "StepConfig",
    "StepReport",
    "TrainingSample",
    "accumulate_gradients",
    "add_lora",
    "enable_full_finetuning",
    "load_adapter",
    "load_lora_state_dict",
    "lora_state_dict",
    "recompute_backward",
    "recompute_loss",
    "reuse_backward",
    "save_adapter",
]
