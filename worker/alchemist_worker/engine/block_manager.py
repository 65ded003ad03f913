"""Which KV-cache blocks are free, and which belong to which sequence.

A block holds `block_size` consecutive tokens of one sequence in every layer. A sequence of n tokens needs
ceil(n / block_size) blocks; its block table lists them in order, so token i lives in slot
`block_table[i // block_size] * block_size + i % block_size`. No prefix sharing: every block has one owner.
"""

from __future__ import annotations

from collections import deque

from alchemist_worker.engine.sequence import Sequence


class OutOfBlocks(RuntimeError):
    """Raised when an allocation is attempted without checking `can_allocate` first."""


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._owner: dict[int, str] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_missing(self, seq: Sequence, num_tokens: int) -> int:
        """How many more blocks `seq` needs so that its first `num_tokens` tokens have a slot."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(seq.block_table))

    def can_allocate(self, count: int, reserve: int = 0) -> bool:
        """True when `count` blocks can be taken and at least `reserve` stay free afterwards."""
        return len(self._free) - count >= reserve

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Extends `seq`'s block table so that its first `num_tokens` tokens have a slot."""
        missing = self.blocks_missing(seq, num_tokens)
        if missing > len(self._free):
            raise OutOfBlocks(
                f"request {seq.request_id} needs {missing} blocks, only {len(self._free)} are free"
            )
        for _ in range(missing):
            block = self._free.popleft()
            self._owner[block] = seq.request_id
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Returns all of `seq`'s blocks; its K/V is gone (a later prefill must recompute it)."""
        for block in seq.block_table:
            if self._owner.pop(block, None) != seq.request_id:
                raise RuntimeError(f"block {block} freed by {seq.request_id}, which does not own it")
            self._free.append(block)
        seq.block_table = []
        seq.num_computed_tokens = 0
