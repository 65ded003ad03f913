"""Recording at prefill into the activation store: the engine's `PrefillRecording` over `PrefillRecorder`.

One recorder per recorded prefill batch keeps only the sequences chosen for recording, under the configured
policy; after the forward pass each record goes into the store under its request id (the response id the
API returned), where the store's byte budgets decide its tier (device, host) or drop it. The copies a recorder
still makes run beside the forward's next layers: on a side stream on CUDA, on a copy thread on a CPU.
"""

from __future__ import annotations

import logging
import time

import torch

from alchemist_worker.activations.policy import RecordingPolicy, parse_policy
from alchemist_worker.activations.recorder import CopyThread, PrefillRecorder
from alchemist_worker.activations.store import ActivationStore, DropReason, StoreConfig, Tier
from alchemist_worker.engine.config import RecordingConfig
from alchemist_worker.engine.recording import RecordingStats
from alchemist_worker.model.config import ModelConfig
from alchemist_worker.model.layer_activations import Recorder

# The eviction count comes from the store's full statistics, which walk every record: refreshed at most this
# often, since the engine reports statistics after every iteration. Byte counts are always current.
EVICTIONS_REFRESH_S = 0.5

log = logging.getLogger(__name__)


class StoreRecording:
    def __init__(
        self,
        store: ActivationStore,
        policy: RecordingPolicy,
        model_config: ModelConfig,
        *,
        record_dtype: torch.dtype | None = None,
    ) -> None:
        self.store = store
        self._policy = policy
        self.model_config = model_config
        self.record_dtype = record_dtype  # None: the model's dtype
        cuda = store.device.type == "cuda" and torch.cuda.is_available()
        self.copy_stream = torch.cuda.Stream(store.device) if cuda else None
        self.copy_thread = CopyThread() if store.device.type == "cpu" else None  # started at its first copy
        self._pending: tuple[PrefillRecorder, list[str | None]] | None = None
        self.recorded = 0
        self._evicted = 0
        self._evicted_at = float("-inf")

    @classmethod
    def from_config(cls, config: RecordingConfig, model_config: ModelConfig, device: str) -> StoreRecording:
        store = ActivationStore(
            StoreConfig(
                device_budget_bytes=config.device_budget_bytes,
                host_budget_bytes=config.host_budget_bytes,
                device=device,
            )
        )
        record_dtype = None if config.dtype == "auto" else getattr(torch, config.dtype)
        return cls(store, parse_policy(config.policy), model_config, record_dtype=record_dtype)

    @property
    def policy(self) -> str:
        return self._policy.value

    def begin(
        self, cu_seqlens: list[int], input_ids: list[int], record_ids: list[str | None], weight_version: int
    ) -> Recorder:
        if self._pending is not None:
            raise RuntimeError("a recorded prefill is still uncommitted")
        recorder = PrefillRecorder(
            self._policy,
            cu_seqlens,
            torch.tensor(input_ids, dtype=torch.long),
            num_layers=self.model_config.num_layers,
            version=weight_version,
            qk_norm=self.model_config.qk_norm,
            keep=[rid is not None for rid in record_ids],
            copy_stream=self.copy_stream,
            copy_thread=self.copy_thread,
            record_dtype=self.record_dtype,
        )
        self._pending = (recorder, list(record_ids))
        return recorder

    def commit(self, recorder: Recorder) -> None:
        if self._pending is None or self._pending[0] is not recorder:
            raise RuntimeError("commit() must follow begin() with the recorder it returned")
        pending, record_ids = self._pending
        self._pending = None
        try:
            records = pending.records()
        except Exception:  # a copy made beside the forward failed: the step has served, its records are lost
            log.warning("recording of %s failed", [r for r in record_ids if r is not None], exc_info=True)
            return
        for record_id, record in zip(record_ids, records, strict=True):
            if record_id is not None and record is not None:
                self.store.put(record_id, record)
                self.recorded += 1

    def discard(self, recorder: Recorder) -> None:
        """Forgets the recorder of a failed forward pass: nothing of it is stored, and the next begin() works."""
        if self._pending is not None and self._pending[0] is recorder:
            self._pending = None

    def stats(self) -> RecordingStats:
        now = time.monotonic()
        if now - self._evicted_at >= EVICTIONS_REFRESH_S:
            self._evicted = self.store.stats().dropped.get(DropReason.EVICTED.value, 0)
            self._evicted_at = now
        return RecordingStats(
            recorded_requests=self.recorded,
            bytes_by_tier={
                Tier.DEVICE.value: self.store.device_bytes,
                Tier.HOST.value: self.store.host_bytes,
            },
            evicted=self._evicted,
        )
