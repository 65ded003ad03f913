"""How far gradients from bfloat16 records are from exact ones, on SmolLM2-135M-Instruct in float32.

The model gets LoRA adapters on every projection (random B, so every adapter gradient is non-zero). Prompts and
responses are consecutive slices of the repository's README, tokenized by the checkpoint's tokenizer. For each
policy, each prompt is prefilled alone and recorded twice, in the model's dtype and in bfloat16; the reuse path
then computes the LoRA gradient from each set of records, and the recompute path (a forward and backward over
prompt + response, no records) gives the reference. Errors are relative, ||g - g_ref|| / ||g_ref|| over all
adapter tensors together, and the worst single tensor.

    .venv/bin/python bench/record_dtype_error.py --prompt 128 --response 32 --samples 4
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.activations.recorder import PrefillRecorder
from alchemist_worker.activations.records import SequenceRecord
from alchemist_worker.activations.store import ActivationStore, StoreConfig
from alchemist_worker.activations.transfer import LayerStreamer
from alchemist_worker.model import DenseCausalAttention, Transformer, load_model
from alchemist_worker.training.batch import TrainingSample
from alchemist_worker.training.lora import LoRAConfig, add_lora
from alchemist_worker.training.recompute import recompute_backward
from alchemist_worker.training.reuse import reuse_backward
from torch import Tensor
from transformers import AutoTokenizer

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def record(
    model: Transformer, prompt: Tensor, policy: RecordingPolicy, dtype: torch.dtype | None
) -> SequenceRecord:
    n = int(prompt.shape[0])
    recorder = PrefillRecorder(
        policy, [0, n], prompt, num_layers=model.config.num_layers, version=0,
        qk_norm=model.config.qk_norm, record_dtype=dtype,
    )  # fmt: skip
    with torch.inference_mode():
        model(prompt, torch.arange(n), DenseCausalAttention([0, n]), recorder)
    (rec,) = recorder.records()
    assert rec is not None
    return rec


def gradients(params: Sequence[Tensor]) -> list[Tensor]:
    out = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return out


def errors(ours: list[Tensor], ref: list[Tensor]) -> tuple[float, float]:
    """(relative error over all tensors together, worst single tensor's relative error)."""
    diff = sum(float((a - b).pow(2).sum()) for a, b in zip(ours, ref, strict=True))
    norm = sum(float(b.pow(2).sum()) for b in ref)
    worst = max(float((a - b).norm() / b.norm()) for a, b in zip(ours, ref, strict=True) if b.norm() > 0)
    return (diff / norm) ** 0.5, worst


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--response", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.model is None:
        from alchemist_worker.bundled_model import ensure_small_model

        args.model = ensure_small_model()
    model = load_model(args.model, dtype=torch.float32)
    torch.manual_seed(args.seed)
    params = add_lora(model, LoRAConfig(rank=16, alpha=32.0, target_modules=TARGETS))
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, 0.02)
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    ids = AutoTokenizer.from_pretrained(args.model)(text)["input_ids"]
    span = args.prompt + args.response
    if len(ids) < args.samples * span:
        raise SystemExit(f"README has {len(ids)} tokens, fewer than {args.samples} x {span}")
    samples = [
        TrainingSample(
            f"s{i}",
            torch.tensor(ids[i * span : i * span + args.prompt]),
            torch.tensor(ids[i * span + args.prompt : (i + 1) * span]),
            record_id=f"r{i}",
        )
        for i in range(args.samples)
    ]
    scale = 1.0 / sum(s.response_len for s in samples)
    recompute_backward(model, samples, scale=scale)
    reference = gradients(params)
    print(
        f"Command: `python bench/record_dtype_error.py --prompt {args.prompt} --response {args.response} "
        f"--samples {args.samples}` (SmolLM2-135M-Instruct, float32, LoRA rank 16 on every projection); "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n"
    )
    print("| policy | records | gradient error vs recompute (all tensors) | worst tensor | MiB per prompt |")
    print("|---|---|---|---|---|")
    for policy in RecordingPolicy:
        for dtype in (None, torch.bfloat16):
            store = ActivationStore(StoreConfig(device_budget_bytes=8 << 30, host_budget_bytes=8 << 30))
            size = 0
            ids = [f"r{i}" for i in range(len(samples))]  # the samples' record ids
            for record_id, s in zip(ids, samples, strict=True):
                rec = record(model, s.prompt_ids, policy, dtype)
                size += rec.nbytes()
                store.put(record_id, rec)
            streamer = LayerStreamer(store, ids, offload=False)
            reuse_backward(model, samples, streamer, scale=scale)
            total, worst = errors(gradients(params), reference)
            name = "float32" if dtype is None else "bfloat16"
            print(
                f"| {policy.value} | {name} | {total:.2e} | {worst:.2e} | {size / len(samples) / 2**20:.1f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
