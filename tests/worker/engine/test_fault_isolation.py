"""One request's failure inside an iteration fails only that request; recording and the scheduler stay usable.

The culprit here is the real overflow a seed outside torch's range causes in the sampler: the API now rejects
such a seed up front, so the tests put it into already-validated parameters to reach the engine anyway.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from alchemist_worker.activations import recorder as recorder_module
from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.activations.store import ActivationStore, StoreConfig
from alchemist_worker.engine.config import RecordingConfig
from alchemist_worker.engine.fault_isolation import run_isolating_faults
from alchemist_worker.engine.llm_engine import LLMEngine
from alchemist_worker.engine.sampling_params import InvalidParameter, SamplingParams
from alchemist_worker.engine.scheduler import ScheduledBatch, StepKind
from alchemist_worker.engine.sequence import FinishReason, Sequence, TokenLogprob
from alchemist_worker.engine.serving_engine import EngineStepFailed, GenerationRequest, RequestFailed
from alchemist_worker.engine.store_recording import StoreRecording
from alchemist_worker.model.config import ModelConfig

from tests.worker.engine.conftest import build_engine, run_to_completion, tokens_of

GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)


def overflowing_seed() -> SamplingParams:
    """Sampled, with seed 2**64: torch's manual_seed raises 'Overflow when unpacking long long'."""
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=7, ignore_eos=True)
    object.__setattr__(params, "seed", 2**64)
    return params


def recording_engine(path: Path) -> tuple[LLMEngine, ActivationStore]:
    store = ActivationStore(StoreConfig(device_budget_bytes=1 << 26, host_budget_bytes=1 << 26))
    recording = StoreRecording(store, RecordingPolicy("kv"), ModelConfig.from_pretrained(path))
    return build_engine(path, recording, recording=RecordingConfig(policy="kv", rate=0.0)), store


# The isolation rule itself, without a model ----------------------------------------------------------------


def fake_batch(*ids: str) -> ScheduledBatch:
    return ScheduledBatch(StepKind.DECODE, [Sequence(i, [1, 2], GREEDY, arrival_time=0.0) for i in ids])


def test_a_failed_batch_is_rerun_alone_and_only_the_culprit_fails() -> None:
    calls: list[list[str]] = []

    def run(batch: ScheduledBatch) -> tuple[list[int], list[TokenLogprob | None]]:
        ids = [seq.request_id for seq in batch.seqs]
        calls.append(ids)
        if "bad" in ids:
            raise ValueError("Overflow when unpacking long long")
        return [len(i) for i in ids], [None] * len(ids)

    results = run_isolating_faults(run, fake_batch("a", "bad", "ccc"))
    assert calls == [["a", "bad", "ccc"], ["a"], ["bad"], ["ccc"]]
    assert [(r.seq.request_id, r.token_id) for r in results if r.error is None] == [("a", 1), ("ccc", 3)]
    error = results[1].error
    assert isinstance(error, RequestFailed) and "Overflow" in str(error)
    assert isinstance(error.__cause__, ValueError)


def test_when_nothing_succeeds_every_sequence_gets_a_retriable_error() -> None:
    calls = 0

    def broken(batch: ScheduledBatch) -> tuple[list[int], list[TokenLogprob | None]]:
        nonlocal calls
        calls += 1
        raise RuntimeError("device lost")

    results = run_isolating_faults(broken, fake_batch("a", "b"))
    assert all(isinstance(r.error, EngineStepFailed) for r in results) and calls == 3
    calls = 0
    (alone,) = run_isolating_faults(broken, fake_batch("a"))
    assert isinstance(alone.error, EngineStepFailed) and calls == 1  # a lone sequence is not run twice


# The native engine ---------------------------------------------------------------------------------------


def test_seed_outside_torchs_range_is_rejected_when_parameters_are_built() -> None:
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(InvalidParameter) as err:
            SamplingParams(seed=seed)
        assert err.value.param == "seed"
    SamplingParams(seed=2**64 - 1)
    SamplingParams(seed=-(2**63))


def test_overflowing_seed_in_a_recorded_prefill_fails_alone_and_recording_goes_on(
    tiny_checkpoints: dict[str, Path],
) -> None:
    path = tiny_checkpoints["llama"]
    reference = run_to_completion(
        build_engine(path),
        [GenerationRequest("a", [5, 9, 13], GREEDY), GenerationRequest("b", [8, 8, 30, 2], GREEDY)],
    )
    engine, store = recording_engine(path)
    outputs = run_to_completion(
        engine,
        [
            GenerationRequest("a", [5, 9, 13], GREEDY, record=True),
            GenerationRequest("x", [40, 41, 42], overflowing_seed(), record=True),
            GenerationRequest("b", [8, 8, 30, 2], GREEDY),
        ],
    )
    (failed,) = outputs["x"]
    assert failed.finished and failed.finish_reason is FinishReason.ABORT
    assert isinstance(failed.error, RequestFailed) and "Overflow" in str(failed.error)
    for rid in "ab":  # the others finish exactly as they would have alone
        assert outputs[rid][-1].error is None and outputs[rid][-1].finish_reason is FinishReason.LENGTH
        assert tokens_of(outputs[rid]) == tokens_of(reference[rid])
    assert "a" in store and "x" not in store and "b" not in store
    later = run_to_completion(engine, [GenerationRequest("c", [7, 7, 7], GREEDY, record=True)])
    assert later["c"][-1].recorded and "c" in store
    assert engine.block_manager.num_used_blocks == 0


def test_a_recorded_prefill_after_a_failed_forward_pass_records(
    tiny_checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, store = recording_engine(tiny_checkpoints["llama"])
    real_run = engine.runner.run

    def fail_once(*args: Any) -> tuple[list[int], list[TokenLogprob | None]]:
        monkeypatch.setattr(engine.runner, "run", real_run)
        raise RuntimeError("out of memory during the forward pass")

    monkeypatch.setattr(engine.runner, "run", fail_once)
    first = run_to_completion(engine, [GenerationRequest("first", [3, 4, 5], GREEDY, record=True)])
    assert isinstance(first["first"][-1].error, EngineStepFailed) and "first" not in store
    second = run_to_completion(engine, [GenerationRequest("second", [3, 4, 5], GREEDY, record=True)])
    assert second["second"][-1].error is None and second["second"][-1].recorded
    assert "second" in store


def test_a_failed_record_copy_loses_the_record_not_the_request(
    tiny_checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A prompt sampled beside one that is not is copied on the copy thread; if that copy fails, the step
    has served its tokens anyway: the requests finish as without recording, and only the record is lost."""
    path = tiny_checkpoints["llama"]
    requests = [
        GenerationRequest("a", [5, 9, 13, 2, 7], GREEDY, record=True),
        GenerationRequest("b", [8, 8, 30, 2, 4, 4, 9], GREEDY, record=False),
    ]
    reference = run_to_completion(build_engine(path), requests)

    def broken(source: Any, into: Any) -> None:
        raise MemoryError("no room for the copy")

    monkeypatch.setattr(recorder_module, "_plain_copy", broken)
    engine, store = recording_engine(path)
    with caplog.at_level(logging.WARNING):
        outputs = run_to_completion(engine, requests)
    for rid in "ab":
        assert outputs[rid][-1].error is None and tokens_of(outputs[rid]) == tokens_of(reference[rid])
    assert "a" not in store and "recording of ['a'] failed" in caplog.text
    monkeypatch.undo()
    later = run_to_completion(engine, [GenerationRequest("c", [7, 7, 7], GREEDY, record=True)])
    assert later["c"][-1].error is None and "c" in store


def test_a_request_failing_mid_decode_leaves_the_batch_decoding(
    tiny_checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_checkpoints["qwen3"]
    requests = [GenerationRequest(rid, [6 + i, 20, 31], GREEDY) for i, rid in enumerate("abc")]
    reference = run_to_completion(build_engine(path), requests)
    engine = build_engine(path)
    real_generator = engine.runner._generator

    def generator(seq: Sequence) -> Any:
        if seq.request_id == "b" and seq.num_output_tokens >= 2:
            raise ValueError("this request's generator broke")
        return real_generator(seq)

    monkeypatch.setattr(engine.runner, "_generator", generator)
    outputs = run_to_completion(engine, requests)
    assert isinstance(outputs["b"][-1].error, RequestFailed)
    assert tokens_of(outputs["b"]) == tokens_of(reference["b"])[:2]  # what it streamed before failing
    for rid in "ac":
        assert tokens_of(outputs[rid]) == tokens_of(reference[rid]) and outputs[rid][-1].error is None
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished()
