"""The start-up self-check, and recording when vLLM preempts requests for lack of KV cache."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.model import load_model
from alchemist_worker.vllm_backend import runner_hooks
from alchemist_worker.vllm_backend.runner_hooks import VllmCompatibilityError, check_runner, check_version

from tests.worker.vllm_backend.conftest import native_record, prompt_of, request, run_all, tokens, vllm_engine


def test_a_runner_that_moved_on_is_refused_with_the_vllm_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_hooks, "vllm_version", lambda: "0.40.1")
    runner = SimpleNamespace(execute_model=lambda output: None, input_batch=SimpleNamespace(req_ids=[]))
    with pytest.raises(VllmCompatibilityError, match=r"vLLM 0\.40\.1.*query_start_loc"):
        check_runner(runner)
    with pytest.raises(VllmCompatibilityError, match=r"vLLM 0\.40\.1 is installed"):
        check_version()


def test_the_installed_vllm_passes_the_check() -> None:
    check_version()  # the pinned version; the runner's check runs in every engine the other tests build


@pytest.mark.slow
def test_records_stay_exact_when_vllm_preempts(tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints["llama"]
    # 4 blocks of 128 tokens (1 KiB per token over 2 layers): four requests growing past 128 tokens cannot all fit
    engine = vllm_engine(path, "selective", kv_cache_bytes=4 * 128 * 1024, max_num_seqs=4)
    vocab = engine.model_config.vocab_size
    prompts = {f"r{i}": prompt_of(100 + 7 * i, vocab, 40 + i) for i in range(4)}
    for rid, prompt in prompts.items():
        engine.add_request(request(rid, prompt, max_tokens=60))
    outputs = run_all(engine)
    assert engine.stats().num_preemptions > 0, "the KV cache was large enough: nothing was preempted"
    assert all(len(tokens(outputs[rid])) == 60 for rid in prompts)
    native = load_model(path)
    for rid, prompt in prompts.items():
        ours = engine.recording.store.get(rid)
        assert ours is not None and ours.token_ids.tolist() == prompt  # never the re-prefilled output tokens
        ref = native_record(native, prompt, RecordingPolicy.SELECTIVE)
        for a, b in zip(ours.layers, ref.layers, strict=True):
            for name in a:
                assert (a[name] - b[name]).abs().max() <= 1e-4, f"{rid} {name}"
