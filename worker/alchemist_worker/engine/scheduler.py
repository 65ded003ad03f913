"""Decides what each engine iteration computes: a batch of prefills or one decode step for all running.

Continuous batching: new requests join between iterations; finished ones leave. An iteration is either
- a prefill batch: waiting sequences in arrival order, whole (no chunking, so a recorded prefill is exactly
  one forward pass over the prompt), as many as fit the token budget, the sequence limit and the free blocks;
- or a decode step: one new token for every running sequence.
Prefills go first when any is admissible, as in vLLM's original scheduler: it minimizes time to first token.

Preemption by recomputation. When a decode step needs a block and none is free, the most recently admitted
running sequence gives up all its blocks and returns to the front of the waiting queue; later it is prefilled
again over its prompt and the tokens generated so far, and continues where it stopped. We chose recomputation
over swapping to host memory because (1) prefill is compute-bound and fast compared with decoding the same
tokens, so for the short contexts of this engine's models a recompute costs less than a PCIe round trip plus
the pinned host memory it would hold, (2) host memory is already the activation store's spill tier, and (3) it
needs no second cache layout or copy stream. The cost is one extra prefill per preemption; `num_preemptions`
is counted per sequence and in the engine's stats. Recording is never repeated by a recompute.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from alchemist_worker.engine.block_manager import BlockManager, blocks_for
from alchemist_worker.engine.sequence import FinishReason, Sequence, SequenceStatus


class StepKind(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class ScheduledBatch:
    kind: StepKind
    seqs: list[Sequence]
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(seq.num_uncomputed_tokens for seq in self.seqs)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        watermark_blocks: int = 0,
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.watermark_blocks = watermark_blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # While True, only sequences already in flight (started on the current weights) are admitted.
        self.admit_new = True
        self.total_preemptions = 0

    # Queue management -------------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        need = blocks_for(seq.num_tokens, self.block_manager.block_size)
        if need > self.block_manager.num_blocks:
            raise ValueError(
                f"request {seq.request_id} needs {need} KV blocks, the cache has "
                f"{self.block_manager.num_blocks}: raise the KV budget or lower max_model_len"
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def find(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                return seq
        return None

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Removes `seq` from whichever queue holds it and frees its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        if seq.block_table:
            self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def has_in_flight(self) -> bool:
        """Whether any sequence has started (been prefilled at least once) and not finished."""
        return bool(self.running) or any(seq.weight_version is not None for seq in self.waiting)

    # Scheduling -------------------------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch | None:
        """The next iteration's work, or None when nothing can run."""
        prefills = self._admit_prefills()
        if prefills:
            return ScheduledBatch(StepKind.PREFILL, prefills)
        if not self.running:
            return None
        decodes, preempted = self._reserve_decode_slots()
        return ScheduledBatch(StepKind.DECODE, decodes, preempted)

    def _admissible(self, seq: Sequence) -> bool:
        return self.admit_new or seq.weight_version is not None

    def _admit_prefills(self) -> list[Sequence]:
        batch: list[Sequence] = []
        budget = self.max_num_batched_tokens
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._admissible(seq):
                # Keep arrival order among new requests; in-flight (preempted) ones sit at the front anyway.
                break
            tokens = seq.num_tokens
            if tokens > budget:
                break
            need = self.block_manager.blocks_missing(seq, tokens)
            # Leave a few blocks for running sequences to grow into, unless nothing else runs.
            reserve = self.watermark_blocks if self.running else 0
            if not self.block_manager.can_allocate(need, reserve):
                break
            self.waiting.popleft()
            self.block_manager.grow(seq, tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.append(seq)
            budget -= tokens
        return batch

    def _reserve_decode_slots(self) -> tuple[list[Sequence], list[Sequence]]:
        """Gives every running sequence a slot for its next token, preempting the newest when blocks run out."""
        queue = list(self.running)  # admission order: the oldest keeps its blocks longest
        scheduled: list[Sequence] = []
        preempted: list[Sequence] = []
        while queue:
            seq = queue.pop(0)
            need = self.block_manager.blocks_missing(seq, seq.num_tokens)
            while not self.block_manager.can_allocate(need) and queue:
                victim = queue.pop()
                self._preempt(victim)
                preempted.append(victim)
            if self.block_manager.can_allocate(need):
                self.block_manager.grow(seq, seq.num_tokens)
                scheduled.append(seq)
            else:
                self._preempt(seq)
                preempted.append(seq)
        # Preempted sequences resume first, oldest first.
        for seq in sorted(preempted, key=lambda s: s.arrival_time, reverse=True):
            self.waiting.appendleft(seq)
        return scheduled, preempted

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.total_preemptions += 1
