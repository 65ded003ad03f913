"""What vLLM serves, kept in step with the trainer's model: one base copy, adapters and weights published in place.

`model` is the native `Transformer` the trainer and the worker's scoring use; its base weights are views of
vLLM's tensors (weight_views.py). The runtime installs a version into `model` (LoRA adapters, or under full
fine-tuning a separate set of weights) through `TrainableWeights`; `publish()`, called by the engine between
iterations with nothing in flight, copies what is installed into what vLLM reads: the adapters into the
fixed-address adapter buffers of each layer, and any base weight that is no longer the served tensor itself
into that tensor. Nothing is reallocated, so compiled graphs and CUDA graphs keep their addresses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from alchemist_worker.model.config import ModelConfig
from alchemist_worker.model.layers import LoRALinear
from alchemist_worker.vllm_backend.weight_views import build_view_model

ATTENTION_SLICES = ("q_proj", "k_proj", "v_proj")
MLP_SLICES = ("gate_proj", "up_proj")


def _adapter_of(module: LoRALinear) -> tuple[Tensor, Tensor, float] | None:
    if module.lora_A is None or module.lora_B is None:
        return None
    return module.lora_A.detach(), module.lora_B.detach(), module.scaling


class ServedWeights:
    def __init__(self, served: Any, config: ModelConfig) -> None:
        self.served: Any = served
        self.config = config
        self.model = build_view_model(served, config)
        # Our name -> the served tensor (a view) it was built on; full fine-tuning writes versions here.
        self.slots: dict[str, Tensor] = {
            name: p.data for name, p in self.model.named_parameters(remove_duplicate=False)
        }

    @torch.no_grad()
    def publish(self) -> None:
        """Copies the version installed in `model` into the tensors vLLM serves from."""
        for ours, theirs in zip(self.model.layers, self.served.model.layers, strict=True):
            attn: Any = ours.self_attn
            mlp: Any = ours.mlp
            self._load(theirs.self_attn.qkv_adapter, [getattr(attn, n) for n in ATTENTION_SLICES], "qkv")
            self._load(theirs.self_attn.o_adapter, [attn.o_proj], "o_proj")
            self._load(theirs.gate_up_adapter, [getattr(mlp, n) for n in MLP_SLICES], "gate_up")
            self._load(theirs.down_adapter, [mlp.down_proj], "down_proj")
        installed = dict(self.model.named_parameters(remove_duplicate=False))
        for name, slot in self.slots.items():
            current = installed[name]
            if current.data_ptr() != slot.data_ptr():
                slot.copy_(current.detach())

    @staticmethod
    def _load(buffers: Any, modules: list[LoRALinear], what: str) -> None:
        adapters = [_adapter_of(m) for m in modules]
        if buffers is None:
            if any(a is not None for a in adapters):
                raise RuntimeError(
                    f"the version has a LoRA adapter on {what} but vLLM was started without one there: "
                    "the worker's LoRA target modules changed since the engine started"
                )
            return
        targeted = [a for a, wanted in zip(adapters, buffers.targeted, strict=True) if wanted]
        buffers.load(targeted)
