"""Loading HF checkpoints (config.json + single or sharded safetensors) into `Transformer`, and the name
mapping between HF's `model.layers.0...` keys and ours (ours drop the `model.` prefix; `lm_head` is shared).

Every problem is reported before any weight is assigned: missing or unexpected tensors, wrong shapes, a shard
index pointing at missing files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from alchemist_worker.model.config import ConfigError, ModelConfig
from alchemist_worker.model.transformer import Transformer

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
# Tensors some checkpoints carry that the model recomputes instead.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint whose files or tensors do not match its config."""


def from_hf_name(name: str) -> str:
    """HF tensor name -> our parameter name (`model.layers.0.mlp.up_proj.weight` -> `layers.0.mlp...`)."""
    return name.removeprefix("model.")


def to_hf_name(name: str) -> str:
    """Our parameter name -> HF tensor name."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory, from the shard index when there is one."""
    index = path / SHARD_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{index} is not a valid shard index (needs a 'weight_map'): {exc}"
            ) from exc
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise CheckpointError(f"{path} has neither {SINGLE_FILE} nor {SHARD_INDEX}")


def read_hf_tensors(path: Path, dtype: torch.dtype) -> dict[str, Tensor]:
    """Every tensor of the checkpoint, under our names, cast to `dtype`."""
    tensors: dict[str, Tensor] = {}
    for file in safetensors_files(path):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    if key.endswith(IGNORED_SUFFIXES):
                        continue
                    tensors[from_hf_name(key)] = handle.get_tensor(key).to(dtype)
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read {file}: {exc}") from exc
    return tensors


def load_model(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Transformer:
    """A `Transformer` with the checkpoint's weights, in `dtype` on `device`, in eval mode."""
    path = Path(path)
    config = ModelConfig.from_pretrained(path)
    tensors = read_hf_tensors(path, dtype)
    with torch.device("meta"):
        model = Transformer(config)
    expected = {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)  # some tied checkpoints still store a copy
    _check_names_and_shapes(path, expected, tensors)
    model.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def _check_names_and_shapes(path: Path, expected: dict[str, torch.Size], tensors: dict[str, Tensor]) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{to_hf_name(k)}: checkpoint {tuple(tensors[k].shape)}, config expects {tuple(shape)}"
        for k, shape in expected.items()
        if k in tensors and tensors[k].shape != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {[to_hf_name(k) for k in missing][:8]}")
    if unexpected:
        problems.append(f"unexpected tensors {[to_hf_name(k) for k in unexpected][:8]}")
    if wrong:
        problems.append(f"wrong shapes {wrong[:8]}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match its config.json: " + "; ".join(problems))


def hf_state_dict(model: Transformer) -> dict[str, Tensor]:
    """The base weights under HF names (adapters excluded), e.g. to save a fully fine-tuned version."""
    out: dict[str, Tensor] = {}
    for name, param in model.named_parameters():
        if ".lora_" in name:
            continue
        out[to_hf_name(name)] = param.detach()
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


__all__ = [
    "CheckpointError",
    "ConfigError",
    "from_hf_name",
    "hf_state_dict",
    "load_model",
    "read_hf_tensors",
    "safetensors_files",
    "to_hf_name",
]
