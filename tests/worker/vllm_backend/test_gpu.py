"""On a CUDA device, with compilation and CUDA graphs on: recording still sees every recorded prefill.

vLLM may replay a step as a CUDA graph, where no Python runs (the record op's body included); a step that
records runs its compiled code outside CUDA graphs (see runner_hooks.py). The prompt of 33 tokens under a 32-token step budget ends with a one-token chunk mixed with
decodes: the shape vLLM would run as a full decode graph. Run by scripts/gpu-check; skipped without CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.model import load_model

from tests.worker.vllm_backend.conftest import native_record, prompt_of, request, run_all, vllm_engine

pytestmark = pytest.mark.gpu


def test_records_under_cuda_graphs_equal_the_native_model(tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints["llama"]
    engine = vllm_engine(
        path, "full", compile=True, device="cuda", dtype="bfloat16", max_num_batched_tokens=32, max_num_seqs=4
    )
    vocab = engine.model_config.vocab_size
    short, odd = prompt_of(9, vocab, 1), prompt_of(33, vocab, 2)
    engine.add_request(request("short", short, max_tokens=16))
    engine.step()
    engine.add_request(request("odd", odd, max_tokens=4))
    outputs = run_all(engine)
    assert outputs["odd"][-1].finished
    native = load_model(path, dtype=torch.bfloat16, device="cuda")
    for rid, prompt in (("short", short), ("odd", odd)):
        ours = engine.recording.store.get(rid)
        assert ours is not None and ours.token_ids.tolist() == prompt
        ref = native_record(native, prompt, RecordingPolicy.FULL)
        for a, b in zip(ours.layers, ref.layers, strict=True):
            for name in a:
                x, y = a[name].float().cuda(), b[name].float().cuda()
                assert (x - y).norm() <= 0.03 * y.norm() + 1e-3, f"{rid} {name}"
