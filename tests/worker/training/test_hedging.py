"""Hedging: samples whose records cannot be used are recomputed in the same step, with the reason reported,
and the step's gradient is still that of the whole batch."""

from pathlib import Path

import torch
from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.activations.store import ActivationStore, StoreConfig
from alchemist_worker.training.batch import TrainingSample
from alchemist_worker.training.hedging import Decision, Reason
from alchemist_worker.training.recompute import recompute_backward
from alchemist_worker.training.step import StepConfig, accumulate_gradients

from tests.worker.training.conftest import (
    grads,
    make_samples,
    record_prompts,
    relative_error,
    trainable_model,
    zero_grads,
)

SHAPES = [(6, 3), (4, 2), (5, 4), (7, 2), (3, 3), (8, 1), (5, 5), (4, 4)]


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_each_unusable_record_is_recomputed_with_its_reason(tiny_checkpoints: dict[str, Path]) -> None:
    model, params = trainable_model(tiny_checkpoints["qwen2"], "lora")
    samples = make_samples(model.config.vocab_size, SHAPES)
    current = 3
    # each prompt prefilled alone: records of one step would share its buffers, and evicting one alone frees none
    records = [record_prompts(model, [s], RecordingPolicy.FULL, version=current)[0] for s in samples]
    size = max(r.nbytes() for r in records)
    clock = Clock()
    store = ActivationStore(
        StoreConfig(device_budget_bytes=0, host_budget_bytes=size * 6, ttl_s=60.0), clock=clock
    )
    # s0 reused; s1 evicted (pushed out while the others are held); s2 expired; s3 stale; s4 wrong policy;
    # s5 prompt mismatch; s6 never stored; s7 names no record.
    store.put("r2", records[2])
    clock.now = 100.0
    records[3].version = current - 2
    kv_record = record_prompts(model, [samples[4]], RecordingPolicy.KV, version=current)[0]
    other = record_prompts(model, [samples[0]], RecordingPolicy.FULL, version=current)[0]
    store.put("r1", records[1])
    held = ["r0", "r3", "r4", "r5"]
    for rid, rec in zip(held, [records[0], records[3], kv_record, other], strict=True):
        store.put(rid, rec)
    store.acquire(held)
    fillers = 0
    while "r1" in store and fillers < 10:
        filler = record_prompts(model, [samples[0]], RecordingPolicy.FULL, version=current)[0]
        store.put(f"filler{fillers}", filler)
        fillers += 1
    for i in range(fillers):
        store.pop(f"filler{i}")
    store.release(held)
    samples[7] = TrainingSample("s7", samples[7].prompt_ids, samples[7].response_ids, record_id=None)
    assert all(rid in store for rid in held) and "r1" not in store

    zero_grads(params)
    config = StepConfig(accepted_policies=frozenset({RecordingPolicy.FULL}), max_staleness=1)
    report = accumulate_gradients(model, store, samples, version=current, config=config)
    got = {o.sample_id: (o.decision, o.reason) for o in report.outcomes}
    assert got == {
        "s0": (Decision.REUSED, None),
        "s1": (Decision.RECOMPUTED, Reason.EVICTED),
        "s2": (Decision.RECOMPUTED, Reason.EXPIRED),
        "s3": (Decision.RECOMPUTED, Reason.STALE),
        "s4": (Decision.RECOMPUTED, Reason.INCOMPATIBLE_POLICY),
        "s5": (Decision.RECOMPUTED, Reason.PROMPT_MISMATCH),
        "s6": (Decision.RECOMPUTED, Reason.MISSING),
        "s7": (Decision.RECOMPUTED, Reason.NOT_RECORDED),
    }
    assert report.reused == 1 and report.recomputed == 7 and sum(report.reasons.values()) == 7
    assert report.reused_prompt_tokens == samples[0].prompt_len
    assert "r0" not in store  # consumed

    mixed = grads(params)
    zero_grads(params)
    total = sum(s.response_len for s in samples)
    ref_loss = recompute_backward(model, samples, scale=1 / total)
    assert abs(report.loss - ref_loss / total) <= 1e-5 * ref_loss / total
    assert relative_error(mixed, grads(params)) <= 1e-5


def test_staleness_within_the_bound_reuses(tiny_checkpoints: dict[str, Path]) -> None:
    model, _ = trainable_model(tiny_checkpoints["llama"], "lora")
    samples = make_samples(model.config.vocab_size, [(5, 3)])
    store = ActivationStore(StoreConfig(device_budget_bytes=1 << 24))
    store.put("r0", record_prompts(model, samples, RecordingPolicy.KV, version=4)[0])
    report = accumulate_gradients(
        model, store, samples, version=6, config=StepConfig(max_staleness=2, consume_records=False)
    )
    assert report.outcomes[0].decision is Decision.REUSED and report.outcomes[0].record_version == 4
    report = accumulate_gradients(model, store, samples, version=7, config=StepConfig(max_staleness=2))
    assert report.outcomes[0].reason is Reason.STALE
    assert torch.isfinite(torch.tensor(report.loss))
