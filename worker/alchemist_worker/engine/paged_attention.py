"""The paged KV cache and the attention backend that reads and writes it.

The cache is allocated once (`KVCache.allocate`), as two tensors [layers, blocks, block_size, kv_heads,
head_dim]; a layer only ever sees views of its slice. Each iteration builds one `PagedAttention` with that
iteration's metadata (passed explicitly, no global state) and hands it to the model as its
`AttentionBackend`:

- prefill: the batch's tokens are whole sequences with nothing cached (no chunking, no prefix sharing, and a
  recomputed sequence starts from scratch), so attention runs over the batch's own K/V with the model's varlen
  kernel, exactly as a plain prefill would (which keeps recording exact), and K/V are written to their slots;
- decode: one query per sequence; its K/V are written first, then it attends over its cached blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from alchemist_worker.model.attention import varlen_attention


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        """K and V of one block in every layer."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element

    def blocks_within(self, budget_bytes: int) -> int:
        return budget_bytes // self.bytes_per_block


class KVCache:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        self.device = device
        self.k: Tensor = torch.empty(0)
        self.v: Tensor = torch.empty(0)

    @classmethod
    def allocate(cls, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> KVCache:
        """The one place that allocates KV memory: [layers, blocks, block_size, kv_heads, head_dim] for K and V."""
        cache = cls(spec, num_blocks, device)
        shape = (spec.num_layers, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        cache.k = torch.zeros(shape, dtype=spec.dtype, device=device)
        cache.v = torch.zeros(shape, dtype=spec.dtype, device=device)
        return cache

    def layer(self, index: int) -> tuple[Tensor, Tensor]:
        """Views of one layer's K and V: [blocks, block_size, kv_heads, head_dim]."""
        return self.k[index], self.v[index]


@dataclass(frozen=True)
class PrefillMetadata:
    slot_mapping: Tensor  # [T] int64: cache slot of each token
    cu_seqlens: list[int]  # [num_seqs + 1] token offsets of each sequence in the flat batch


@dataclass(frozen=True)
class DecodeMetadata:
    slot_mapping: Tensor  # [B] int64: cache slot of each sequence's new token
    block_tables: Tensor  # [B, max_blocks] int64, padded with 0 (masked by context_lens)
    context_lens: Tensor  # [B] int64: tokens to attend to, the new one included


class PagedAttention:
    """An `AttentionBackend` over the paged cache for one iteration."""

    def __init__(
        self,
        cache: KVCache,
        metadata: PrefillMetadata | DecodeMetadata,
        *,
        sliding_window: int | None = None,
        scale: float | None = None,
    ) -> None:
        self.cache = cache
        self.metadata = metadata
        self.sliding_window = sliding_window
        self.scale = cache.spec.head_dim**-0.5 if scale is None else scale
        self._decode_mask: Tensor | None = None

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, *, need_lse: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """q: [T, H, D], k/v: [T, KVH, D] -> out [T, H, D], lse [T, H] fp32 when need_lse."""
        k_cache, v_cache = self.cache.layer(layer)
        spec = self.cache.spec
        slots = self.metadata.slot_mapping
        k_cache.view(-1, spec.num_kv_heads, spec.head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
        v_cache.view(-1, spec.num_kv_heads, spec.head_dim).index_copy_(0, slots, v.to(v_cache.dtype))
        if isinstance(self.metadata, PrefillMetadata):
            cu = self.metadata.cu_seqlens
            return varlen_attention(
                q, k, v, cu, cu, scale=self.scale, sliding_window=self.sliding_window, need_lse=need_lse
            )
        return self._decode(q, k_cache, v_cache, self.metadata, need_lse)

    def _mask(self, meta: DecodeMetadata, context: int) -> Tensor:
        """[B, 1, 1, S] bool: which gathered cache positions each sequence's query may see."""
        if self._decode_mask is None:
            pos = torch.arange(context, device=meta.context_lens.device)[None, :]  # [1, S]
            lens = meta.context_lens[:, None]  # [B, 1]
            allowed = pos < lens
            if self.sliding_window is not None:
                allowed &= pos >= lens - self.sliding_window
            self._decode_mask = allowed[:, None, None, :]
        return self._decode_mask

    def _decode(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: DecodeMetadata, need_lse: bool
    ) -> tuple[Tensor, Tensor | None]:
        batch, heads, dim = q.shape
        kv_heads = k_cache.shape[2]
        # Gather each sequence's blocks: [B, max_blocks, block_size, KVH, D] -> [B, KVH, S, D].
        keys = k_cache[meta.block_tables].flatten(1, 2).transpose(1, 2)
        values = v_cache[meta.block_tables].flatten(1, 2).transpose(1, 2)
        mask = self._mask(meta, keys.shape[2])
        if not need_lse:
            out = F.scaled_dot_product_attention(
                q.unsqueeze(2), keys, values, attn_mask=mask, scale=self.scale, enable_gqa=kv_heads != heads
            )  # [B, H, 1, D]
            return out.view(batch, heads, dim), None
        groups = heads // kv_heads
        qg = q.view(batch, kv_heads, groups, dim).float()
        scores = torch.matmul(qg, keys.float().transpose(-1, -2)) * self.scale  # [B, KVH, G, S]
        scores = scores.masked_fill(~mask, -math.inf)
        lse = torch.logsumexp(scores, dim=-1)  # [B, KVH, G]
        out = torch.matmul(torch.exp(scores - lse[..., None]), values.float())  # [B, KVH, G, D]
        return out.view(batch, heads, dim).to(q.dtype), lse.view(batch, heads)
