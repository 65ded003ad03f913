"""Recording at prefill inside batched serving, the record sampler, and weight switches between iterations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.activations.recorder import PrefillRecorder
from alchemist_worker.activations.store import ActivationStore, StoreConfig
from alchemist_worker.engine.config import EngineConfigError, RecordingConfig
from alchemist_worker.engine.llm_engine import LLMEngine
from alchemist_worker.engine.recording import RecordSampler
from alchemist_worker.engine.sampling_params import SamplingParams
from alchemist_worker.engine.serving_engine import GenerationRequest, RequestOutput, WeightSwitch
from alchemist_worker.engine.store_recording import StoreRecording
from alchemist_worker.model.attention import DenseCausalAttention

from tests.worker.engine.conftest import build_engine, run_to_completion

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def recording_engine(path: Path, policy: str, rate: float = 0.0) -> tuple[LLMEngine, ActivationStore]:
    from alchemist_worker.model.config import ModelConfig

    store = ActivationStore(StoreConfig(device_budget_bytes=1 << 26, host_budget_bytes=1 << 26))
    recording = StoreRecording(store, RecordingPolicy(policy), ModelConfig.from_pretrained(path))
    engine = build_engine(path, recording, recording=RecordingConfig(policy=policy, rate=rate))
    return engine, store


@pytest.mark.parametrize(("arch", "policy"), [("llama", "kv"), ("qwen3", "full"), ("qwen2", "selective")])
def test_batched_prefill_records_exactly_what_a_lone_prefill_records(
    tiny_checkpoints: dict[str, Path], arch: str, policy: str
) -> None:
    path = tiny_checkpoints[arch]
    engine, store = recording_engine(path, policy)
    prompts = {"a": [5, 9, 13, 2, 77], "b": [8, 8, 30], "c": [40, 41, 42, 43, 44, 45, 46]}
    requests = [
        GenerationRequest("a", prompts["a"], GREEDY, record=True),
        GenerationRequest("b", prompts["b"], GREEDY),  # rate 0: not recorded
        GenerationRequest("c", prompts["c"], GREEDY, record=True),
    ]
    outputs = run_to_completion(engine, requests)
    assert [outputs[r][-1].recorded for r in "abc"] == [True, False, True]
    assert "a" in store and "c" in store and "b" not in store
    model = engine.runner.model
    for rid in "ac":
        record = store.get(rid)
        assert record is not None and record.token_ids.tolist() == prompts[rid] and record.version == 0
        ids = torch.tensor(prompts[rid])
        alone = PrefillRecorder(
            RecordingPolicy(policy), [0, len(ids)], ids, num_layers=model.config.num_layers,
            version=0, qk_norm=model.config.qk_norm,
        )  # fmt: skip
        with torch.inference_mode():
            model(ids, torch.arange(len(ids)), DenseCausalAttention([0, len(ids)]), alone)
        reference = alone.records()[0]
        assert reference is not None
        for got, want in zip(record.layers, reference.layers, strict=True):
            assert got.keys() == want.keys()
            for name in got:
                torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)
    stats = engine.stats()
    assert stats.recorded_requests_total == 2 and sum(stats.recorded_bytes_by_tier.values()) == sum(
        store.get(r).nbytes()
        for r in "ac"  # type: ignore[union-attr]
    )


def test_recording_is_not_repeated_after_preemption(tiny_checkpoints: dict[str, Path]) -> None:
    from alchemist_worker.model.config import ModelConfig

    path = tiny_checkpoints["llama"]
    store = ActivationStore(StoreConfig(device_budget_bytes=1 << 26))
    recording = StoreRecording(store, RecordingPolicy.KV, ModelConfig.from_pretrained(path))
    engine = build_engine(
        path, recording, recording=RecordingConfig(policy="kv", rate=1.0), num_kv_blocks=16, max_model_len=64,
        watermark=0.0,
    )  # fmt: skip
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    requests = [GenerationRequest(f"r{i}", [7 + i] * 10, params) for i in range(4)]
    run_to_completion(engine, requests)
    assert engine.stats().num_preemptions > 0
    assert store.stats().puts == 4 and all(store.get(f"r{i}").num_tokens == 10 for i in range(4))  # type: ignore[union-attr]


def test_record_sampler_rate_and_preferences() -> None:
    off = RecordSampler(RecordingConfig(policy="off", rate=1.0))
    assert not off.decide(True) and not off.decide(None)
    sampler = RecordSampler(RecordingConfig(policy="kv", rate=0.25, seed=3))
    assert sampler.decide(True) and not sampler.decide(False)
    share = sum(sampler.decide(None) for _ in range(4000)) / 4000
    assert 0.22 < share < 0.28
    never = RecordSampler(RecordingConfig(policy="kv", rate=0.0))
    assert not any(never.decide(None) for _ in range(100))


def test_recording_policy_needs_a_store(tiny_checkpoints: dict[str, Path]) -> None:
    with pytest.raises(EngineConfigError, match="activation store"):
        build_engine(tiny_checkpoints["llama"], recording=RecordingConfig(policy="kv", rate=0.5))


def test_weight_switch_waits_for_in_flight_requests(tiny_checkpoints: dict[str, Path]) -> None:
    engine = build_engine(tiny_checkpoints["llama"])
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine.add_request(GenerationRequest("old", [5, 6, 7], params))
    engine.step()  # "old" is prefilled on version 0
    applied: list[int] = []
    engine.request_weight_switch(WeightSwitch(1, apply=lambda: applied.append(engine.stats().num_running)))
    engine.add_request(GenerationRequest("new", [8, 9], params))
    log: list[RequestOutput] = []
    while engine.has_unfinished():
        log.extend(engine.step())
    old = [o for o in log if o.request_id == "old"]
    new = [o for o in log if o.request_id == "new"]
    assert applied == [0]  # applied once, with nothing running
    assert all(o.weight_version == 0 for o in old) and all(o.weight_version == 1 for o in new)
    assert log.index(new[0]) > log.index(old[-1])  # "new" started only after "old" finished
    assert engine.weight_version == 1
    with pytest.raises(ValueError, match="not newer"):
        engine.request_weight_switch(WeightSwitch(1, apply=lambda: None))


def test_weight_switch_with_nothing_in_flight_applies_at_the_next_step(
    tiny_checkpoints: dict[str, Path],
) -> None:
    engine = build_engine(tiny_checkpoints["llama"])
    applied: list[bool] = []
    engine.request_weight_switch(WeightSwitch(3, apply=lambda: applied.append(True)))
    assert applied == [] and engine.stats().switch_pending_s >= 0
    assert engine.has_unfinished()  # so that an idle engine loop still steps and applies it
    engine.step()
    assert applied == [True] and engine.weight_version == 3 and not engine.has_unfinished()
