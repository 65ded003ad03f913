"""Moving layers of activations between the host and the device during a training step, one layer at a time.

A training step walks the layers forward (the response attends to each layer's prompt K/V) and then backward
(each prompt layer replayed from its record). `LayerStreamer` gives it layer l of the step's records on the
device while layer l+1 (forward) or l-1 (backward) is already being copied, and sends layers back to the host
once used when offload is on, so the device holds about two layers of records at a time instead of all of them.
The step's own response activations, kept from its forward for the backward, travel the same way
(training/reuse.py `KeptActivations`).

`SideCopies` are the copies themselves: on CUDA they run on a side stream with pinned host memory and events
order them against compute. On a CPU-only machine the same calls run synchronously, and the copies are
relabelings (the tiers share memory); the store's accounting still shows what a GPU would hold.
"""

from __future__ import annotations

import torch

from alchemist_worker.activations.records import LayerTensors
from alchemist_worker.activations.store import ActivationStore, Tier


class SideCopies:
    """Copies of a layer's tensors to the device or to the host, beside the compute stream on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def to_device(self, tensors: LayerTensors) -> tuple[LayerTensors, torch.cuda.Event | None]:
        """Device copies and the event after which they may be read (None: ready now)."""
        if self.stream is None:
            return {name: t.to(self.device) for name, t in tensors.items()}, None
        with torch.cuda.stream(self.stream):
            moved = {name: t.to(self.device, non_blocking=True) for name, t in tensors.items()}
        event = torch.cuda.Event()
        event.record(self.stream)
        return moved, event

    def wait(self, event: torch.cuda.Event | None, tensors: LayerTensors) -> None:
        """Makes the compute stream wait for copies started by `to_device`, before it reads `tensors`."""
        if event is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for t in tensors.values():
            t.record_stream(current)

    def to_host(self, tensors: LayerTensors) -> LayerTensors:
        """Host copies, started once the compute queued so far (which reads or writes `tensors`) has run."""
        if self.stream is None:
            return {name: t.cpu() for name, t in tensors.items()}
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        host = {}
        with torch.cuda.stream(self.stream):
            for name, t in tensors.items():
                host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host[name].copy_(t, non_blocking=True)
                t.record_stream(self.stream)  # keep the device memory until the copy has run
        return host

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


class LayerStreamer:
    def __init__(self, store: ActivationStore, record_ids: list[str], *, offload: bool) -> None:
        self.store = store
        self.record_ids = list(record_ids)
        self.offload_after_use = offload
        self.device = store.device
        self.num_layers = min((store.peek(r).num_layers for r in record_ids), default=0)
        self.copies = SideCopies(self.device)
        self._ready: dict[int, torch.cuda.Event | None] = {}

    def prefetch(self, layer: int) -> None:
        """Starts bringing `layer` of every record to the device (no-op if out of range or under way)."""
        if not 0 <= layer < self.num_layers or layer in self._ready:
            return
        event = None
        for rid in self.record_ids:
            if self.store.layer_tier(rid, layer) is Tier.DEVICE:
                continue
            if self.copies.stream is None:
                self.store.move_layer(rid, layer, Tier.DEVICE)
                continue
            moved, event = self.copies.to_device(self.store.peek(rid).layers[layer])
            self.store.move_layer(rid, layer, Tier.DEVICE, moved)
        self._ready[layer] = event  # the last record's event: the side stream runs the copies in order

    def fetch(self, layer: int) -> list[LayerTensors]:
        """Layer `layer` of each record (in record_ids order), on the device and safe to read now."""
        self.prefetch(layer)
        event = self._ready.pop(layer)
        layers = [self.store.peek(rid).layers[layer] for rid in self.record_ids]
        for tensors in layers:
            self.copies.wait(event, tensors)
        return layers

    def done_with(self, layer: int) -> None:
        """Called once the compute that reads `layer` is queued: sends it back to the host if offloading."""
        if not self.offload_after_use:
            return
        for rid in self.record_ids:
            if self.store.layer_tier(rid, layer) is not Tier.DEVICE:
                continue
            if self.copies.stream is None:
                self.store.move_layer(rid, layer, Tier.HOST)
                continue
            host = self.copies.to_host(self.store.peek(rid).layers[layer])
            self.store.move_layer(rid, layer, Tier.HOST, host)

    def synchronize(self) -> None:
        self.copies.synchronize()
