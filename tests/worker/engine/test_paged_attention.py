"""Paged attention against the model's varlen kernel: cache writes, block gathers, GQA, windows and LSE."""

from __future__ import annotations

import random

import pytest
import torch
from alchemist_worker.engine.model_runner import slots_of
from alchemist_worker.engine.paged_attention import (
    DecodeMetadata,
    KVCache,
    KVCacheSpec,
    PagedAttention,
    PrefillMetadata,
)
from alchemist_worker.model.attention import varlen_attention

HEADS, KV_HEADS, DIM, BLOCK = 4, 2, 32, 4


def make_cache(num_blocks: int = 32) -> KVCache:
    spec = KVCacheSpec(
        num_layers=2, num_kv_heads=KV_HEADS, head_dim=DIM, block_size=BLOCK, dtype=torch.float32
    )
    return KVCache.allocate(spec, num_blocks, torch.device("cpu"))


def test_cache_size_follows_the_budget() -> None:
    spec = KVCacheSpec(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype=torch.bfloat16)
    assert spec.bytes_per_block == 2 * 30 * 16 * 3 * 64 * 2
    assert spec.blocks_within(10 * spec.bytes_per_block + 5) == 10


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("need_lse", [False, True])
def test_prefill_then_decode_equals_full_causal_attention(window: int | None, need_lse: bool) -> None:
    torch.manual_seed(0)
    cache = make_cache()
    lengths = [5, 1, 9]
    free = list(range(cache.num_blocks))
    random.Random(0).shuffle(free)  # blocks of a sequence are not contiguous
    tables = [[free.pop() for _ in range(-(-(n + 1) // BLOCK))] for n in lengths]
    total = sum(lengths) + len(lengths)  # every sequence: its prompt and one decoded token
    q, k, v = (
        torch.randn(total, HEADS, DIM),
        torch.randn(total, KV_HEADS, DIM),
        torch.randn(total, KV_HEADS, DIM),
    )
    starts = [sum(n + 1 for n in lengths[:i]) for i in range(len(lengths))]

    # Prefill every prompt in one flat batch (layer 1, so that layer 0 stays untouched).
    prompt_rows = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    slots = [slot for t, n in zip(tables, lengths, strict=True) for slot in slots_of(t, 0, n, BLOCK)]
    prefill = PagedAttention(cache, PrefillMetadata(torch.tensor(slots), cu), sliding_window=window)
    out, _ = prefill.attend(1, q[prompt_rows], k[prompt_rows], v[prompt_rows])
    ref, _ = varlen_attention(q[prompt_rows], k[prompt_rows], v[prompt_rows], cu, cu, sliding_window=window)
    torch.testing.assert_close(out, ref)
    assert cache.k[0].abs().sum() == 0

    # Decode one token per sequence over the cache.
    rows = torch.tensor([s + n for s, n in zip(starts, lengths, strict=True)])
    width = max(len(t) for t in tables)
    meta = DecodeMetadata(
        slot_mapping=torch.tensor(
            [slots_of(t, n, n + 1, BLOCK)[0] for t, n in zip(tables, lengths, strict=True)]
        ),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        context_lens=torch.tensor([n + 1 for n in lengths]),
    )
    out, lse = PagedAttention(cache, meta, sliding_window=window).attend(
        1, q[rows], k[rows], v[rows], need_lse=need_lse
    )
    full_cu = [0]
    for n in lengths:
        full_cu.append(full_cu[-1] + n + 1)
    ref_out, ref_lse = varlen_attention(
        q[rows], k, v, [0, 1, 2, 3], full_cu, sliding_window=window, need_lse=True
    )
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    if need_lse:
        assert lse is not None and ref_lse is not None
        torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    else:
        assert lse is None
