"""Shared setup for the training tests: models with random adapters, samples of uneven lengths, records."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.activations.recorder import PrefillRecorder
from alchemist_worker.activations.records import SequenceRecord
from alchemist_worker.activations.store import ActivationStore, StoreConfig
from alchemist_worker.model import DenseCausalAttention, Transformer, load_model
from alchemist_worker.training.batch import TrainingSample, offsets
from alchemist_worker.training.lora import LoRAConfig, add_lora, enable_full_finetuning

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (prompt, response) lengths: uneven, a one-token prompt, a one-token response
SHAPES = [(7, 3), (1, 4), (12, 1), (5, 6)]


def trainable_model(path: Path, mode: str, *, dtype: torch.dtype = torch.float32, seed: int = 1):
    """(model, trainable params); LoRA adapters get random B so every gradient is non-zero."""
    model = load_model(path, dtype=dtype)
    torch.manual_seed(seed)
    if mode == "lora":
        params = add_lora(model, LoRAConfig(rank=4, alpha=8.0, target_modules=ALL_TARGETS))
        with torch.no_grad():
            for p in params:
                p.normal_(0.0, 0.05)
    else:
        params = enable_full_finetuning(model)
    return model, params


def make_samples(vocab: int, shapes=SHAPES, seed: int = 0) -> list[TrainingSample]:
    gen = torch.Generator().manual_seed(seed)
    return [
        TrainingSample(
            f"s{i}",
            torch.randint(0, vocab, (p,), generator=gen),
            torch.randint(0, vocab, (r,), generator=gen),
            record_id=f"r{i}",
        )
        for i, (p, r) in enumerate(shapes)
    ]


def record_prompts(
    model: Transformer, samples: list[TrainingSample], policy: RecordingPolicy, version: int = 0
) -> list[SequenceRecord]:
    """Records of the samples' prompts from one batched prefill, as the engine would make them."""
    ids = torch.cat([s.prompt_ids for s in samples])
    cu = offsets([s.prompt_len for s in samples])
    positions = torch.cat([torch.arange(s.prompt_len) for s in samples])
    recorder = PrefillRecorder(
        policy, cu, ids, num_layers=model.config.num_layers, version=version, qk_norm=model.config.qk_norm
    )
    with torch.inference_mode():
        model(ids, positions, DenseCausalAttention(cu, sliding_window=model.config.sliding_window), recorder)
    records = recorder.records()
    assert all(r is not None for r in records)
    return [r for r in records if r is not None]


def held_bytes(records: list[SequenceRecord]) -> int:
    """Bytes of the distinct buffers the records hold (the prompts of one prefill share its buffers)."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for r in records
        for layer in r.layers
        for t in layer.values()
    }
    return sum(storages.values())


def big_store(**kwargs) -> ActivationStore:
    return ActivationStore(StoreConfig(device_budget_bytes=1 << 30, host_budget_bytes=1 << 30, **kwargs))


def grads(params) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def zero_grads(params) -> None:
    for p in params:
        p.grad = None


def relative_error(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Worst per-tensor ||ours - ref|| / ||ref|| (tensors with a zero reference must match exactly)."""
    worst = 0.0
    for a, b in zip(ours, ref, strict=True):
        diff, norm = (a.double() - b.double()).norm().item(), b.double().norm().item()
        worst = max(worst, diff / norm if norm > 0 else diff * 1e30)
    return worst


def global_relative_error(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """||ours - ref|| / ||ref|| over all tensors as one vector."""
    diff = sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(ours, ref, strict=True))
    norm = sum((b.double() ** 2).sum() for b in ref)
    return float((diff / norm) ** 0.5)


@pytest.fixture
def store() -> ActivationStore:
    return big_store()
