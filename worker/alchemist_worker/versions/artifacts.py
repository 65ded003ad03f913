"""A version's files in formats other tools load: a PEFT LoRA adapter, or full safetensors weights.

LoRA: `adapter_config.json` + `adapter_model.safetensors`, exactly what `peft.PeftModel.from_pretrained(base,
dir)` reads. Tensor names follow PEFT's saved form, `base_model.model.<module>.lora_A.weight` (no adapter name).
Full fine-tuning: `model.safetensors` with the checkpoint's own (HF) tensor names plus its `config.json`, so the
directory loads with `transformers` like the original checkpoint. The trainer's own state (optimizer moments,
schedule position) sits beside them in `trainer_state.pt`; other tools ignore it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FULL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"
TRAINER_STATE = "trainer_state.pt"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraSpec:
    """The adapter's shape; the fields PEFT's LoraConfig needs to rebuild it."""

    r: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str = ""
    dropout: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_peft_config(self) -> dict[str, Any]:
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": sorted(self.target_modules),
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": None,
            "use_rslora": False,
            "use_dora": False,
            **self.extra,
        }

    @classmethod
    def from_peft_config(cls, raw: Mapping[str, Any]) -> LoraSpec:
        if raw.get("peft_type") != "LORA":
            raise ValueError(f"not a LoRA adapter config: peft_type={raw.get('peft_type')!r}")
        targets = raw["target_modules"]
        return cls(
            r=int(raw["r"]),
            alpha=float(raw["lora_alpha"]),
            target_modules=tuple([targets] if isinstance(targets, str) else targets),
            base_model=str(raw.get("base_model_name_or_path") or ""),
            dropout=float(raw.get("lora_dropout", 0.0)),
        )


def _contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses views that share storage; detach and own each tensor.
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}


def peft_name(name: str) -> str:
    """`model.layers.0.self_attn.q_proj.lora_A.weight` -> PEFT's saved name (idempotent)."""
    return name if name.startswith(PEFT_PREFIX) else PEFT_PREFIX + name


def write_lora_adapter(dest: Path, tensors: Mapping[str, torch.Tensor], spec: LoraSpec) -> None:
    if not tensors:
        raise ValueError("a LoRA adapter needs at least one tensor")
    for name in tensors:
        if ".lora_A." not in name and ".lora_B." not in name:
            raise ValueError(f"{name!r} is not a LoRA tensor (expected '.lora_A.' or '.lora_B.' in the name)")
    save_file(_contiguous({peft_name(n): t for n, t in tensors.items()}), str(dest / ADAPTER_WEIGHTS))
    (dest / ADAPTER_CONFIG).write_text(json.dumps(spec.to_peft_config(), indent=2))


def read_lora_adapter(src: Path) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
    """The adapter's spec and tensors, names without PEFT's `base_model.model.` prefix."""
    spec = LoraSpec.from_peft_config(json.loads((src / ADAPTER_CONFIG).read_text()))
    tensors = load_file(str(src / ADAPTER_WEIGHTS))
    return spec, {n.removeprefix(PEFT_PREFIX): t for n, t in tensors.items()}


def write_full_weights(dest: Path, tensors: Mapping[str, torch.Tensor], model_config: Path | None) -> None:
    save_file(_contiguous(tensors), str(dest / FULL_WEIGHTS), metadata={"format": "pt"})
    if model_config is not None:
        shutil.copyfile(model_config, dest / MODEL_CONFIG)


def read_full_weights(src: Path) -> dict[str, torch.Tensor]:
    return load_file(str(src / FULL_WEIGHTS))


def write_trainer_state(dest: Path, state: Mapping[str, Any]) -> None:
    torch.save(dict(state), dest / TRAINER_STATE)


def read_trainer_state(src: Path) -> dict[str, Any] | None:
    path = src / TRAINER_STATE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds {type(state).__name__}, expected a dict")
    return state
