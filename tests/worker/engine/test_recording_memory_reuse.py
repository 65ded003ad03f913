"""Recording in the steady state of a serving process: the store at its budget evicts a record for each new
one, and the allocator hands the evicted records' memory to the next prefills. Nothing a record or a training
step still references may be written by that reuse, and records made in reused memory are the same bytes."""

from __future__ import annotations

from pathlib import Path

import torch
from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.activations.records import LayerTensors
from alchemist_worker.activations.store import ActivationStore, DropReason, StoreConfig
from alchemist_worker.engine.config import RecordingConfig
from alchemist_worker.engine.sampling_params import SamplingParams
from alchemist_worker.engine.serving_engine import GenerationRequest
from alchemist_worker.engine.store_recording import StoreRecording
from alchemist_worker.model.config import ModelConfig

from tests.worker.engine.conftest import build_engine, run_to_completion

GREEDY = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
PROMPT = [5, 9, 13, 2, 77, 31, 8, 8, 30, 40, 41, 42]


def snapshot(layers: list[LayerTensors]) -> list[dict[str, torch.Tensor]]:
    return [{name: t.clone() for name, t in layer.items()} for layer in layers]


def assert_same_bytes(got: list[LayerTensors], want: list[dict[str, torch.Tensor]]) -> None:
    for layer_got, layer_want in zip(got, want, strict=True):
        assert layer_got.keys() == layer_want.keys()
        for name in layer_got:
            assert torch.equal(layer_got[name], layer_want[name]), name


def test_evicted_records_memory_is_reused_only_once_nothing_references_it(
    tiny_checkpoints: dict[str, Path],
) -> None:
    path = tiny_checkpoints["llama"]
    config = ModelConfig.from_pretrained(path)
    probe = ActivationStore(StoreConfig(device_budget_bytes=1 << 26))
    engine = build_engine(
        path, StoreRecording(probe, RecordingPolicy.FULL, config), recording=RecordingConfig(policy="full")
    )
    run_to_completion(engine, [GenerationRequest("probe", PROMPT, GREEDY, record=True)])
    size = probe.peek("probe").nbytes()

    store = ActivationStore(StoreConfig(device_budget_bytes=2 * size))  # two records; the third evicts
    engine = build_engine(
        path, StoreRecording(store, RecordingPolicy.FULL, config), recording=RecordingConfig(policy="full")
    )
    run_to_completion(engine, [GenerationRequest("first", PROMPT, GREEDY, record=True)])
    held = list(store.peek("first").layers)  # what a training step holds once it fetched the layers
    expected = snapshot(held)
    for i in range(6):  # same-sized prompts: their tensors fit exactly in the memory evictions free
        prompt = [(t * (i + 3)) % 97 + 1 for t in PROMPT]
        run_to_completion(engine, [GenerationRequest(f"other{i}", prompt, GREEDY, record=True)])
    assert store.lookup("first").reason is DropReason.EVICTED
    assert store.stats().dropped[DropReason.EVICTED.value] >= 5
    assert_same_bytes(held, expected)  # evicted, but still referenced: never written

    run_to_completion(engine, [GenerationRequest("again", PROMPT, GREEDY, record=True)])
    assert_same_bytes(store.peek("again").layers, expected)  # made in reused memory: the same bytes
