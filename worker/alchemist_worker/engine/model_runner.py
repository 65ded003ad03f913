"""All device work of the engine: the KV cache, input tensors of an iteration, the forward pass and sampling.

The runner turns a scheduled batch into flat tensors (tokens of several sequences back to back, no padding),
builds that iteration's `PagedAttention` metadata, runs the model, computes logits only at each sequence's
last token, and samples. On CUDA it would run the same code; nothing here is CPU-specific.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch
from torch import Tensor

from alchemist_worker.engine.paged_attention import (
    DecodeMetadata,
    KVCache,
    KVCacheSpec,
    PagedAttention,
    PrefillMetadata,
)
from alchemist_worker.engine.sampler import sample, seeded_generator
from alchemist_worker.engine.scheduler import ScheduledBatch, StepKind
from alchemist_worker.engine.sequence import Sequence, TokenLogprob
from alchemist_worker.model.config import ModelConfig
from alchemist_worker.model.layer_activations import Recorder
from alchemist_worker.model.transformer import Transformer


def slots_of(block_table: Seq[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slots of token positions [start, end) of a sequence with this block table."""
    return [block_table[i // block_size] * block_size + i % block_size for i in range(start, end)]


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        *,
        block_size: int,
        num_blocks: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.config: ModelConfig = model.config
        self.device = device
        self.spec = KVCacheSpec(
            num_layers=self.config.num_layers,
            num_kv_heads=self.config.num_kv_heads,
            head_dim=self.config.head_dim,
            block_size=block_size,
            dtype=dtype,
        )
        self.cache = KVCache.allocate(self.spec, num_blocks, device)
        self._generators: dict[str, torch.Generator] = {}

    def release(self, request_id: str) -> None:
        """Forgets per-request device state (its random generator) once the request is done."""
        self._generators.pop(request_id, None)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None or seq.params.greedy:
            return None
        gen = self._generators.get(seq.request_id)
        if gen is None:
            gen = self._generators[seq.request_id] = seeded_generator(seq.params.seed, self.device)
        return gen

    def _tensor(self, values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def prepare_prefill(self, seqs: list[Sequence]) -> tuple[Tensor, Tensor, PrefillMetadata, Tensor]:
        """Flat input ids, positions, metadata, and the row of each sequence's last token."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        for seq in seqs:
            start, end = seq.num_computed_tokens, seq.num_tokens
            if start:
                raise RuntimeError(f"request {seq.request_id}: prefill over a cached prefix is not supported")
            ids.extend(seq.token_ids)
            positions.extend(range(end))
            slots.extend(slots_of(seq.block_table, 0, end, self.spec.block_size))
            cu.append(cu[-1] + end)
        meta = PrefillMetadata(slot_mapping=self._tensor(slots), cu_seqlens=cu)
        last_rows = self._tensor([c - 1 for c in cu[1:]])
        return self._tensor(ids), self._tensor(positions), meta, last_rows

    def prepare_decode(self, seqs: list[Sequence]) -> tuple[Tensor, Tensor, DecodeMetadata]:
        width = max(len(seq.block_table) for seq in seqs)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in seqs]
        last = [seq.num_tokens - 1 for seq in seqs]
        meta = DecodeMetadata(
            slot_mapping=self._tensor(
                [
                    slots_of(s.block_table, p, p + 1, self.spec.block_size)[0]
                    for s, p in zip(seqs, last, strict=True)
                ]
            ),
            block_tables=torch.tensor(tables, dtype=torch.long, device=self.device),
            context_lens=self._tensor([seq.num_tokens for seq in seqs]),
        )
        return self._tensor([seq.token_ids[-1] for seq in seqs]), self._tensor(last), meta

    @torch.inference_mode()
    def run(
        self, batch: ScheduledBatch, recorder: Recorder | None = None
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """One forward pass over the batch; returns each sequence's next token (and log probabilities)."""
        seqs = batch.seqs
        window = self.config.sliding_window
        if batch.kind is StepKind.PREFILL:
            input_ids, positions, prefill_meta, rows = self.prepare_prefill(seqs)
            attention = PagedAttention(self.cache, prefill_meta, sliding_window=window)
            hidden = self.model(input_ids, positions, attention, recorder)  # [T, hidden]
            hidden = hidden[rows]  # [B, hidden]
        else:
            if recorder is not None:
                raise ValueError("decode steps never record")
            input_ids, positions, decode_meta = self.prepare_decode(seqs)
            attention = PagedAttention(self.cache, decode_meta, sliding_window=window)
            hidden = self.model(input_ids, positions, attention)  # [B, hidden]
        logits = self.model.compute_logits(hidden)  # [B, vocab]
        return sample(
            logits,
            [seq.params for seq in seqs],
            [seq.output_token_ids for seq in seqs],
            [self._generator(seq) for seq in seqs],
        )
