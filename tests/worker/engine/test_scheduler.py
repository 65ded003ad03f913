"""Scheduler and block manager: admission under budgets, decode growth, preemption by recomputation."""

from __future__ import annotations

import pytest
from alchemist_worker.engine.block_manager import BlockManager, OutOfBlocks, blocks_for
from alchemist_worker.engine.sampling_params import SamplingParams
from alchemist_worker.engine.scheduler import Scheduler, StepKind
from alchemist_worker.engine.sequence import FinishReason, Sequence, SequenceStatus


def make_seq(rid: str, prompt_len: int, t: float = 0.0) -> Sequence:
    return Sequence(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=100), arrival_time=t)


def run_step(batch_seqs: list[Sequence]) -> None:
    """What the engine does after a forward pass: K/V computed, one token appended."""
    for seq in batch_seqs:
        seq.num_computed_tokens = seq.num_tokens
        seq.append_token(7)
        if seq.weight_version is None:
            seq.weight_version = 0


def test_blocks_for_rounds_up() -> None:
    assert [blocks_for(n, 4) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]


def test_block_manager_grow_and_free() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq("a", 5)
    bm.grow(seq, 5)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 2
    bm.grow(seq, 8)  # still fits in two blocks
    assert len(seq.block_table) == 2
    with pytest.raises(OutOfBlocks):
        bm.grow(seq, 17)
    bm.free(seq)
    assert bm.num_free_blocks == 4 and seq.block_table == [] and seq.num_computed_tokens == 0


def test_block_manager_rejects_foreign_free() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    a, b = make_seq("a", 3), make_seq("b", 3)
    bm.grow(a, 3)
    b.block_table = list(a.block_table)
    with pytest.raises(RuntimeError, match="does not own"):
        bm.free(b)


def test_prefills_respect_token_budget_and_seq_limit() -> None:
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=3, max_num_batched_tokens=10)
    for i, n in enumerate([4, 5, 3, 2]):
        sched.add(make_seq(f"r{i}", n, t=i))
    batch = sched.schedule()
    assert batch is not None and batch.kind is StepKind.PREFILL
    assert [s.request_id for s in batch.seqs] == ["r0", "r1"]  # 4 + 5 <= 10, + 3 would exceed
    run_step(batch.seqs)
    batch = sched.schedule()
    assert batch is not None and [s.request_id for s in batch.seqs] == ["r2"]  # seq limit 3 reached
    run_step(batch.seqs)
    batch = sched.schedule()
    assert batch is not None and batch.kind is StepKind.DECODE and len(batch.seqs) == 3


def test_new_request_joins_running_batch() -> None:
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=64)
    sched.add(make_seq("a", 3))
    first = sched.schedule()
    assert first is not None
    run_step(first.seqs)
    decode = sched.schedule()
    assert decode is not None and decode.kind is StepKind.DECODE
    run_step(decode.seqs)
    sched.add(make_seq("b", 6, t=1))
    joined = sched.schedule()
    assert joined is not None and joined.kind is StepKind.PREFILL and joined.seqs[0].request_id == "b"
    run_step(joined.seqs)
    both = sched.schedule()
    assert both is not None and {s.request_id for s in both.seqs} == {"a", "b"}


def test_decode_preempts_newest_and_resumes_it_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    old, new = make_seq("old", 8, t=0), make_seq("new", 8, t=1)
    sched.add(old)
    sched.add(new)
    batch = sched.schedule()
    assert batch is not None and len(batch.seqs) == 2 and bm.num_free_blocks == 0
    run_step(batch.seqs)  # both now hold 9 tokens: each needs a third block
    decode = sched.schedule()
    assert decode is not None and decode.kind is StepKind.DECODE
    assert [s.request_id for s in decode.seqs] == ["old"]
    assert [s.request_id for s in decode.preempted] == ["new"]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0 and new.block_table == []
    assert new.num_preemptions == 1 and sched.total_preemptions == 1
    assert sched.waiting[0] is new
    # The preempted sequence keeps its generated token and is prefilled again over all 9 tokens.
    assert new.num_tokens == 9
    sched.finish(old, FinishReason.STOP)
    again = sched.schedule()
    assert again is not None and again.kind is StepKind.PREFILL and again.seqs == [new]
    assert new.num_uncomputed_tokens == 9


def test_lone_sequence_preempts_itself_then_resumes() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = make_seq("a", 4, t=0), make_seq("b", 8, t=1)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch is not None
    run_step(batch.seqs)
    decode = sched.schedule()  # a needs block 2, b needs block 3: b goes, then a fits
    assert decode is not None and decode.seqs == [a] and decode.preempted == [b]


def test_watermark_keeps_blocks_for_running_sequences() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, watermark_blocks=1)
    sched.add(make_seq("a", 4))
    first = sched.schedule()
    assert first is not None
    run_step(first.seqs)
    sched.add(make_seq("b", 12, t=1))  # needs 3 blocks; 3 are free but one is held back
    batch = sched.schedule()
    assert batch is not None and batch.kind is StepKind.DECODE


def test_paused_admission_lets_only_in_flight_sequences_in() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    inflight, fresh = make_seq("inflight", 3), make_seq("fresh", 3, t=1)
    inflight.weight_version = 0  # started before the pause (e.g. preempted)
    sched.add(inflight)
    sched.add(fresh)
    sched.admit_new = False
    batch = sched.schedule()
    assert batch is not None and batch.seqs == [inflight]
    assert sched.schedule() is not None  # decode of the in-flight one
    assert list(sched.waiting) == [fresh] and sched.has_in_flight()


def test_abort_frees_blocks_of_running_and_removes_waiting() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=64)
    a, b = make_seq("a", 5), make_seq("b", 5, t=1)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert sched.find("a") is a and sched.find("b") is b and sched.find("c") is None
    sched.finish(a, FinishReason.ABORT)
    sched.finish(b, FinishReason.ABORT)
    assert bm.num_free_blocks == 8 and not sched.has_unfinished()
    assert a.finish_reason is FinishReason.ABORT and b.status is SequenceStatus.FINISHED


def test_prompt_larger_than_cache_is_rejected() -> None:
    sched = Scheduler(BlockManager(2, 4), max_num_seqs=8, max_num_batched_tokens=64)
    with pytest.raises(ValueError, match="KV blocks"):
        sched.add(make_seq("big", 9))
