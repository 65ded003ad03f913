"""Moving records' layers between the host and the device during a training step, one layer at a time.

A training step walks the layers forward (the response attends to each layer's prompt K/V) and then backward
(each prompt layer replayed from its record). `LayerStreamer` gives it layer l on the device while layer
l+1 (forward) or l-1 (backward) is already being copied, and sends layers back to the host once used when
offload is on, so the device holds about two layers of records at a time instead of all of them.

On CUDA the copies run on a side stream with pinned host memory and events order them against compute. On a
CPU-only machine the same calls run synchronously, and the copies are relabelings (the tiers share memory);
the store's accounting still shows what a GPU would hold.
"""

from __future__ import annotations

import torch

from alchemist_worker.activations.records import LayerTensors
from alchemist_worker.activations.store import ActivationStore, Tier


class LayerStreamer:
    def __init__(self, store: ActivationStore, record_ids: list[str], *, offload: bool) -> None:
        self.store = store
        self.record_ids = list(record_ids)
        self.offload_after_use = offload
        self.device = store.device
        self.num_layers = min((store.peek(r).num_layers for r in record_ids), default=0)
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._ready: dict[int, torch.cuda.Event | None] = {}

    def prefetch(self, layer: int) -> None:
        """Starts bringing `layer` of every record to the device (no-op if out of range or under way)."""
        if not 0 <= layer < self.num_layers or layer in self._ready:
            return
        for rid in self.record_ids:
            if self.store.layer_tier(rid, layer) is Tier.DEVICE:
                continue
            host = self.store.peek(rid).layers[layer]
            if self._side is None:
                self.store.move_layer(rid, layer, Tier.DEVICE)
                continue
            with torch.cuda.stream(self._side):
                moved = {name: t.to(self.device, non_blocking=True) for name, t in host.items()}
            self.store.move_layer(rid, layer, Tier.DEVICE, moved)
        if self._side is None:
            self._ready[layer] = None
        else:
            event = torch.cuda.Event()
            event.record(self._side)
            self._ready[layer] = event

    def fetch(self, layer: int) -> list[LayerTensors]:
        """Layer `layer` of each record (in record_ids order), on the device and safe to read now."""
        self.prefetch(layer)
        event = self._ready.pop(layer)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            for rid in self.record_ids:
                for t in self.store.peek(rid).layers[layer].values():
                    t.record_stream(torch.cuda.current_stream(self.device))
        return [self.store.peek(rid).layers[layer] for rid in self.record_ids]

    def done_with(self, layer: int) -> None:
        """Called once the compute that reads `layer` is queued: sends it back to the host if offloading."""
        if not self.offload_after_use:
            return
        for rid in self.record_ids:
            if self.store.layer_tier(rid, layer) is not Tier.DEVICE:
                continue
            tensors = self.store.peek(rid).layers[layer]
            if self._side is None:
                self.store.move_layer(rid, layer, Tier.HOST)
                continue
            self._side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side):
                host = {}
                for name, t in tensors.items():
                    host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    host[name].copy_(t, non_blocking=True)
                    t.record_stream(self._side)  # keep the device memory until the copy has run
            self.store.move_layer(rid, layer, Tier.HOST, host)

    def synchronize(self) -> None:
        if self._side is not None:
            self._side.synchronize()
