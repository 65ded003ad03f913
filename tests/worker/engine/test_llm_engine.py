"""The native engine against HF transformers: greedy output over the paged cache, batching and preemption."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from alchemist_worker.engine.sampling_params import SamplingParams
from alchemist_worker.engine.sequence import FinishReason
from alchemist_worker.engine.serving_engine import GenerationRequest, ServingEngine

from tests.worker.engine.conftest import build_engine, hf_greedy, run_to_completion, tokens_of

NEW_TOKENS = 12


def prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def greedy_requests(token_lists: list[list[int]], max_tokens: int = NEW_TOKENS) -> list[GenerationRequest]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [GenerationRequest(f"r{i}", p, params) for i, p in enumerate(token_lists)]


def test_engine_implements_the_serving_interface(tiny_checkpoints: dict[str, Path]) -> None:
    assert isinstance(build_engine(tiny_checkpoints["llama"]), ServingEngine)


def test_greedy_batch_matches_hf(tiny_checkpoint: Path) -> None:
    engine = build_engine(tiny_checkpoint)
    batch = prompts(engine.runner.config.vocab_size, [1, 5, 9, 17, 30])
    outputs = run_to_completion(engine, greedy_requests(batch))
    expected = hf_greedy(tiny_checkpoint, batch, NEW_TOKENS)
    assert [tokens_of(outputs[f"r{i}"]) for i in range(len(batch))] == expected
    assert all(outputs[f"r{i}"][-1].finish_reason is FinishReason.LENGTH for i in range(len(batch)))
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_requests_joining_a_running_batch_match_hf(tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints["qwen3"]
    engine = build_engine(path)
    batch = prompts(engine.runner.config.vocab_size, [7, 3, 11], seed=1)
    requests = greedy_requests(batch)
    outputs: dict[str, list] = {r.request_id: [] for r in requests}  # type: ignore[type-arg]
    engine.add_request(requests[0])
    for step in range(200):
        if step in (3, 6):  # later arrivals join while r0 decodes
            engine.add_request(requests[1 if step == 3 else 2])
        for out in engine.step():
            outputs[out.request_id].append(out)
        if step > 6 and not engine.has_unfinished():
            break
    assert [tokens_of(outputs[r.request_id]) for r in requests] == hf_greedy(path, batch, NEW_TOKENS)


def test_preemption_by_recompute_keeps_output_exact(tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints["llama"]
    # 16 blocks of 4 tokens hold 64 tokens; four requests growing to 10 + 20 tokens each cannot all fit.
    engine = build_engine(path, num_kv_blocks=16, max_model_len=64, watermark=0.0)
    batch = prompts(engine.runner.config.vocab_size, [10, 10, 10, 10], seed=2)
    outputs = run_to_completion(engine, greedy_requests(batch, max_tokens=20))
    assert engine.stats().num_preemptions > 0
    assert [tokens_of(outputs[f"r{i}"]) for i in range(4)] == hf_greedy(path, batch, 20)


def test_abort_frees_blocks_and_reports_abort(tiny_checkpoints: dict[str, Path]) -> None:
    engine = build_engine(tiny_checkpoints["qwen2"])
    engine.add_request(greedy_requests([[5, 6, 7]], max_tokens=50)[0])
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    engine.abort("r0")
    outs = engine.step()
    assert [(o.request_id, o.finished, o.finish_reason) for o in outs] == [("r0", True, FinishReason.ABORT)]
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished()


def test_stop_token_and_eos_end_generation(tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints["mistral"]
    engine = build_engine(path)
    prompt = prompts(engine.runner.config.vocab_size, [6], seed=3)[0]
    expected = hf_greedy(path, [prompt], NEW_TOKENS)[0]
    stop_at = expected[4]
    first = expected.index(stop_at)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=(stop_at,))
    outs = run_to_completion(engine, [GenerationRequest("s", prompt, params)])["s"]
    assert tokens_of(outs) == expected[: first + 1]
    assert outs[-1].finish_reason is FinishReason.STOP


def test_prompt_validation(tiny_checkpoints: dict[str, Path]) -> None:
    engine = build_engine(tiny_checkpoints["llama"], max_model_len=32)
    params = SamplingParams(max_tokens=4)
    with pytest.raises(ValueError, match="context"):
        engine.add_request(GenerationRequest("long", list(range(3, 35)), params))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request(GenerationRequest("bad", [10**6], params))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(GenerationRequest("empty", [], params))
