"""LoRA adapters on the native model, in the layout `peft` reads and writes, and full fine-tuning.

Targets are HF module names (`q_proj`, `v_proj`, `gate_proj`, ...), as in a PEFT `LoraConfig`. The adapter
state dict uses PEFT's saved key names (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so
`save_adapter` writes a directory that `peft.PeftModel.from_pretrained` loads, and `load_adapter` reads one
that PEFT saved.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from alchemist_worker.model.checkpoint import to_hf_name
from alchemist_worker.model.layers import LoRALinear
from alchemist_worker.model.transformer import Transformer

TARGETABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    use_rslora: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.target_modules) - set(TARGETABLE))
        if unknown or not self.target_modules:
            raise ValueError(f"LoRA target_modules {unknown or '[]'} not among {TARGETABLE}")
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")

    def peft_config(self, base_model: str = "") -> dict[str, object]:
        """The adapter_config.json a PEFT LoraConfig with these settings writes."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "target_modules": sorted(self.target_modules),
            "bias": "none",
            "use_rslora": self.use_rslora,
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "base_model_name_or_path": base_model,
            "inference_mode": True,
        }


def lora_modules(model: Transformer) -> Iterator[tuple[str, LoRALinear]]:
    """(our module name, module) of every linear layer that carries an adapter."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and module.has_adapter:
            yield name, module


def add_lora(model: Transformer, config: LoRAConfig) -> list[nn.Parameter]:
    """Adds zero-initialized adapters to the target modules and freezes every other weight.

    Returns the trainable parameters (the adapters), in a fixed order.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    params: list[nn.Parameter] = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and name.rsplit(".", 1)[-1] in config.target_modules:
            module.add_adapter(config.rank, config.alpha, use_rslora=config.use_rslora)
            assert module.lora_A is not None and module.lora_B is not None
            params += [module.lora_A, module.lora_B]
    return params


def enable_full_finetuning(model: Transformer) -> list[nn.Parameter]:
    """Makes every weight trainable (no adapters) and returns them."""
    for _, module in list(lora_modules(model)):
        module.remove_adapter()
    params = list(model.parameters())
    for param in params:
        param.requires_grad_(True)
    return params


def _peft_key(module_name: str, which: str) -> str:
    return f"{PEFT_PREFIX}{to_hf_name(module_name)}.{which}.weight"


def lora_state_dict(model: Transformer) -> dict[str, Tensor]:
    """The adapters under PEFT's saved key names (what `get_peft_model_state_dict` returns)."""
    out: dict[str, Tensor] = {}
    for name, module in lora_modules(model):
        assert module.lora_A is not None and module.lora_B is not None
        out[_peft_key(name, "lora_A")] = module.lora_A.detach()
        out[_peft_key(name, "lora_B")] = module.lora_B.detach()
    return out


def load_lora_state_dict(model: Transformer, state: dict[str, Tensor]) -> None:
    """Copies PEFT-keyed adapter weights into the model's adapters (which must exist with the same ranks)."""
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter keys do not match the model's adapters: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}"
        )
    with torch.no_grad():
        for key, target in expected.items():
            if state[key].shape != target.shape:
                raise ValueError(f"{key}: adapter has {tuple(state[key].shape)}, model {tuple(target.shape)}")
            target.copy_(state[key])


def save_adapter(model: Transformer, config: LoRAConfig, directory: str | Path, base_model: str = "") -> None:
    """Writes adapter_model.safetensors and adapter_config.json, loadable by peft.PeftModel.from_pretrained."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config.peft_config(base_model), indent=2))


def load_adapter(model: Transformer, directory: str | Path) -> LoRAConfig:
    """Adds the adapters a PEFT directory describes and loads their weights; returns its config."""
    directory = Path(directory)
    raw = json.loads((directory / ADAPTER_CONFIG).read_text())
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{directory} holds a {raw.get('peft_type')} adapter, not LORA")
    unsupported = [
        key
        for key in (
            "use_dora",
            "lora_bias",
            "modules_to_save",
            "layers_to_transform",
            "rank_pattern",
            "alpha_pattern",
        )
        if raw.get(key)
    ]
    if unsupported:
        raise ValueError(f"{directory}: adapter options {unsupported} are not supported")
    targets = raw["target_modules"]
    config = LoRAConfig(
        rank=int(raw["r"]),
        alpha=float(raw["lora_alpha"]),
        target_modules=tuple(sorted(targets if isinstance(targets, list) else [targets])),
        use_rslora=bool(raw.get("use_rslora", False)),
    )
    add_lora(model, config)
    state = load_file(str(directory / ADAPTER_WEIGHTS))
    device = next(model.parameters()).device
    load_lora_state_dict(model, {k: v.to(device) for k, v in state.items()})
    return config
