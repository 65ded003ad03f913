"""The timed steps of the training-reuse benchmark: our baselines, HF transformers + peft, and reuse."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from alchemist_worker.activations import ActivationStore, LayerStreamer, PrefillRecorder, RecordingPolicy
from alchemist_worker.activations.records import SequenceRecord
from alchemist_worker.model import DenseCausalAttention, LayerActivations, Transformer
from alchemist_worker.training import TrainingSample, recompute_backward, reuse_backward
from alchemist_worker.training.batch import offsets

from bench.training_reuse_memory import SavedTensorMeter
from bench.training_reuse_workloads import Workload


def build_model_dir(root: Path, hidden: int, layers: int) -> Path:
    """A random Llama checkpoint (head_dim 64, GQA 4:1, intermediate 2.75x hidden), built once and cached."""
    from tests.fixtures.checkpoints import build_checkpoint

    path = root / f"llama-h{hidden}-l{layers}"
    if not (path / "config.json").exists():
        build_checkpoint(
            path,
            "llama",
            hidden_size=hidden,
            num_layers=layers,
            num_heads=hidden // 64,
            num_key_value_heads=max(1, hidden // 256),
            head_dim=64,
            intermediate_size=int(hidden * 2.75),
        )
    return path


def make_samples(workload: Workload, vocab: int, seed: int) -> list[TrainingSample]:
    gen = torch.Generator().manual_seed(seed)
    return [
        TrainingSample(
            f"{workload.name}-{i}",
            torch.randint(0, vocab, (p,), generator=gen),
            torch.randint(0, vocab, (r,), generator=gen),
            record_id=f"{workload.name}-{i}",
        )
        for i, (p, r) in enumerate(workload.shapes)
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def busy_clock(device: torch.device) -> Callable[[], float]:
    """CPU seconds of this process on a CPU (not advanced while other users' processes hold the cores, so
    ratios survive a shared machine; with one torch thread it is the step's compute time), wall time on CUDA."""
    return time.perf_counter if device.type == "cuda" else time.process_time


class TimedRecorder(PrefillRecorder):
    """A PrefillRecorder that adds up the busy time spent in its hook: the work recording adds to a prefill."""

    hook_seconds = 0.0

    def record_layer(self, layer: int, activations: LayerActivations) -> None:
        clock = busy_clock(activations.x.device)
        start = clock()
        super().record_layer(layer, activations)
        sync(activations.x.device)
        self.hook_seconds += clock() - start


def prefill(
    model: Transformer, samples: list[TrainingSample], policy: RecordingPolicy | None
) -> tuple[list[SequenceRecord | None] | None, float]:
    """The prompts' batched prefill, recording under `policy` (None: no recorder at all); returns the records
    and the busy seconds spent inside the recorder's hook."""
    device = model.lm_head.weight.device
    ids = torch.cat([s.prompt_ids for s in samples]).to(device)
    cu = offsets([s.prompt_len for s in samples])
    positions = torch.cat([torch.arange(s.prompt_len) for s in samples]).to(device)
    recorder: TimedRecorder | None = None
    if policy is not None:
        recorder = TimedRecorder(
            policy, cu, ids, num_layers=model.config.num_layers, version=0, qk_norm=model.config.qk_norm
        )
    with torch.inference_mode():
        model(ids, positions, DenseCausalAttention(cu, sliding_window=model.config.sliding_window), recorder)
    if recorder is None:
        return None, 0.0
    return recorder.records(), recorder.hook_seconds


class Runner:
    """Runs one method's step on the model's trainable params; returns (seconds, peak activation bytes)."""

    def __init__(
        self, model: torch.nn.Module, params: list[torch.nn.Parameter], device: torch.device
    ) -> None:
        self.model, self.params, self.device = model, params, device
        self.exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def timed(self, step: Callable[[], float]) -> tuple[float, float, float]:
        """(busy seconds, wall seconds, peak activation bytes); `step` returns the bytes it holds outside
        autograd's saved tensors (store device tier, K/V leaves)."""
        for p in self.params:
            p.grad = None
        meter = SavedTensorMeter(self.exclude)
        base = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        clock = busy_clock(self.device)
        sync(self.device)
        start, wall = clock(), time.perf_counter()
        with meter:
            extra = step()
        sync(self.device)
        busy, wall = clock() - start, time.perf_counter() - wall
        if self.device.type == "cuda":
            return busy, wall, float(torch.cuda.max_memory_allocated(self.device) - base)
        return busy, wall, float(meter.peak + extra)

    def baseline(self, samples: list[TrainingSample], *, checkpoint: bool) -> tuple[float, float, float]:
        total = sum(s.response_len for s in samples)
        assert isinstance(self.model, Transformer)
        model = self.model

        def step() -> float:
            recompute_backward(model, samples, scale=1 / total, checkpoint_layers=checkpoint)
            return 0.0

        return self.timed(step)

    def reuse(self, samples: list[TrainingSample], store: ActivationStore) -> tuple[float, float, float]:
        total = sum(s.response_len for s in samples)
        ids = [s.record_id for s in samples if s.record_id is not None]
        assert isinstance(self.model, Transformer)
        model = self.model

        def step() -> float:
            store.reset_peak()
            reuse_backward(model, samples, LayerStreamer(store, ids, offload=True), scale=1 / total)
            return float(store.device_peak_bytes)  # records and the response's kept activations together

        return self.timed(step)


def hf_runner(hf: torch.nn.Module, samples: list[TrainingSample], *, batched: bool) -> Callable[[], float]:
    """An HF transformers + peft step computing the same loss (mean over response tokens)."""
    total = sum(s.response_len for s in samples)

    def run(group: list[TrainingSample], weight: float) -> None:
        width = max(s.prompt_len + s.response_len for s in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(group):
            seq = torch.cat([s.prompt_ids, s.response_ids])
            ids[i, : seq.numel()], mask[i, : seq.numel()] = seq, 1
            labels[i, s.prompt_len : seq.numel()] = s.response_ids
        (hf(input_ids=ids, attention_mask=mask, labels=labels).loss * weight).backward()

    def step() -> float:
        if batched:
            run(samples, 1.0)
        else:  # one sample at a time: no padding, the same tokens as ours
            for s in samples:
                run([s], s.response_len / total)
        return 0.0

    return step
