"""The trainable weights of the shared model, double-buffered: one set serves, the other trains.

Serving and training share one `Transformer` (the frozen base weights exist once). What training changes (LoRA
adapters, or every weight under full fine-tuning) exists twice: the *training* set, which the optimizer updates
step after step, and the *serving* set, the values of the version being served, which never change while
requests use them. Between engine iterations the runtime installs the training set for a training slice and the
serving set back after it; installing is a pointer swap in each module's parameter table, so it costs
microseconds and copies nothing. A version switch prepares a new serving set off the hot path and installs it
between iterations (engine.request_weight_switch), so each request runs on exactly one version.

With LoRA the serving set of version 0 (the base model) is "no adapter" (None), so the base model serves at
full speed until the first version exists. Names are ours (`layers.0.self_attn.q_proj.lora_A`); artifact
files use PEFT's (LoRA) or the checkpoint's (full) names, converted here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from alchemist_protocol.schemas import ArtifactKind
from torch import Tensor, nn

from alchemist_worker.continual.settings import Method, TrainerSettings
from alchemist_worker.model.checkpoint import from_hf_name, to_hf_name
from alchemist_worker.model.transformer import Transformer
from alchemist_worker.training.lora import LoRAConfig, add_lora, enable_full_finetuning
from alchemist_worker.versions.artifacts import (
    LoraSpec,
    read_full_weights,
    read_lora_adapter,
    write_full_weights,
    write_lora_adapter,
)

WeightSet = dict[str, "nn.Parameter | None"]


def _lora_file_name(name: str) -> str:
    """`layers.0.self_attn.q_proj.lora_A` -> `model.layers.0.self_attn.q_proj.lora_A.weight` (PEFT, no prefix)."""
    module, which = name.rsplit(".", 1)
    return f"{to_hf_name(module)}.{which}.weight"


class TrainableWeights:
    def __init__(
        self,
        model: Transformer,
        settings: TrainerSettings,
        base_model: str = "",
        *,
        separate_training_copy: bool = False,
    ) -> None:
        """`separate_training_copy`: the model's loaded weights are what another engine serves from (vLLM),
        so full fine-tuning trains a copy of them instead of the loaded tensors themselves."""
        self.model = model
        self.method = settings.method
        self.base_model = base_model
        self.lora: LoRAConfig | None = None
        if settings.method is Method.LORA:
            self.lora = LoRAConfig(
                rank=settings.lora_rank,
                alpha=settings.lora_alpha,
                target_modules=settings.lora_target_modules,
            )
            add_lora(model, self.lora)
        else:
            enable_full_finetuning(model)
            if not settings.train_embeddings:
                model.embed_tokens.weight.requires_grad_(False)
                model.lm_head.weight.requires_grad_(False)
        # Every (module, attribute) slot of each trainable parameter; a tied weight has two slots.
        self._slots: dict[str, list[tuple[nn.Module, str]]] = {}
        by_id: dict[int, str] = {}
        for module_name, module in model.named_modules():
            for attr, param in module._parameters.items():
                if param is None or not param.requires_grad:
                    continue
                name = by_id.setdefault(id(param), f"{module_name}.{attr}" if module_name else attr)
                self._slots.setdefault(name, []).append((module, attr))
        self.training: WeightSet = {
            name: getattr(slots[0][0], slots[0][1]) for name, slots in self._slots.items()
        }
        if separate_training_copy and self.method is not Method.LORA:
            self.training = {
                name: nn.Parameter(p.detach().clone(), requires_grad=True)
                for name, p in self.training.items()
                if p is not None
            }
            self.install(self.training)
        self.initial = self.snapshot()  # version 0's training weights: what a rollback to the base restores
        self.serving: WeightSet = self.base_serving_set()

    @property
    def kind(self) -> ArtifactKind:
        return ArtifactKind.LORA if self.method is Method.LORA else ArtifactKind.FULL

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.training.values() if p is not None]

    # Installing (engine thread, between iterations).
    def install(self, weights: WeightSet) -> None:
        for name, slots in self._slots.items():
            value = weights[name]
            for module, attr in slots:
                module._parameters[attr] = value

    def use_training(self) -> None:
        self.install(self.training)

    def use_serving(self) -> None:
        self.install(self.serving)

    # Building serving sets.
    def base_serving_set(self) -> WeightSet:
        """The base model: no adapter (LoRA), or the weights as loaded (full; a frozen copy)."""
        if self.method is Method.LORA:
            return dict.fromkeys(self._slots)
        return self.serving_set(self.initial, copy=False)  # the initial snapshot is never written to

    def serving_set(self, tensors: Mapping[str, Tensor], *, copy: bool = True) -> WeightSet:
        """A frozen serving set from a snapshot (our names), on the model's device and dtype."""
        missing = sorted(set(self._slots) - set(tensors))
        if missing:
            raise ValueError(f"a serving set needs every trainable weight; missing {missing[:4]}")
        out: WeightSet = {}
        for name, current in self._items():
            value = tensors[name].to(device=current.device, dtype=current.dtype)
            if value.shape != current.shape:
                raise ValueError(
                    f"{name}: the version has shape {tuple(value.shape)}, the model {tuple(current.shape)}"
                )
            out[name] = nn.Parameter(value.detach().clone() if copy else value.detach(), requires_grad=False)
        return out

    def snapshot(self) -> dict[str, Tensor]:
        """A copy of the training set's current values (taken between slices, so consistent)."""
        return {name: p.detach().clone() for name, p in self._items()}

    def load_training(self, tensors: Mapping[str, Tensor]) -> None:
        """Overwrites the training set in place (optimizer state stays attached to the same tensors)."""
        with torch.no_grad():
            for name, param in self._items():
                param.copy_(tensors[name].to(device=param.device, dtype=param.dtype))

    def _items(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.training.items() if p is not None]

    # Files.
    def write(
        self, directory: Path, snapshot: Mapping[str, Tensor], model_config: Path | None = None
    ) -> None:
        """The artifact of a snapshot: a PEFT adapter (LoRA) or safetensors with HF names (full)."""
        if self.method is Method.LORA:
            assert self.lora is not None
            spec = LoraSpec(
                r=self.lora.rank,
                alpha=self.lora.alpha,
                target_modules=self.lora.target_modules,
                base_model=self.base_model,
            )
            write_lora_adapter(directory, {_lora_file_name(n): t for n, t in snapshot.items()}, spec)
        else:
            write_full_weights(directory, {to_hf_name(n): t for n, t in snapshot.items()}, model_config)

    def read(self, directory: Path) -> dict[str, Tensor]:
        """A version's artifact as a snapshot (our names); raises when it does not fit this model."""
        if self.method is Method.LORA:
            assert self.lora is not None
            spec, tensors = read_lora_adapter(directory)
            if spec.r != self.lora.rank or set(spec.target_modules) != set(self.lora.target_modules):
                raise ValueError(
                    f"{directory}: adapter rank {spec.r} on {sorted(spec.target_modules)} does not match this "
                    f"worker's rank {self.lora.rank} on {sorted(self.lora.target_modules)}"
                )
            by_file = {_lora_file_name(n): n for n in self._slots}
            return {by_file[k]: t for k, t in tensors.items() if k in by_file}
        tensors = read_full_weights(directory)
        return {from_hf_name(k): t for k, t in tensors.items() if from_hf_name(k) in self._slots}
