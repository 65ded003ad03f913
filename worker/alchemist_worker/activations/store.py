"""The activation store: where records wait, between the prefill that made them and the training step that
uses them (or never does: most requests get no feedback).

Tiers: `device` (accelerator memory), `host` (CPU memory, pinned when CUDA exists), `dropped` (gone; a
bounded set of tombstones remembers why, so the trainer can say why it recomputed). Each tier but dropped
has a byte budget. A new record goes to the device if it fits there after spilling the oldest device records
to the host; otherwise to the host, after dropping the oldest host records; otherwise it is dropped. Records
older than the TTL are dropped when next touched (or by `expire()`). Oldest means first put.

Accounting is exact to the byte: per tier, the bytes of every distinct buffer a stored tensor is part of, each
counted once however many records hold views of it (the prompts of one prefill step can share the step's
buffers, see recorder.py), updated on every move. It is exposed as plain numbers (`device_bytes`, `host_bytes`,
`stats()`), ready for a Prometheus gauge (`Gauge.set_function(lambda: store.device_bytes)`). Room is made for the
buffers a new record adds, sparing the records that hold the rest, so a budget is never exceeded; a buffer is
freed once its last record leaves. A record whose buffers fit no tier whole is kept as a copy of its own rows.

Placement is per layer, so a training step can move one layer of a record at a time (`move_layer`) and the
accounting follows. On a CPU-only machine both tiers live in the same memory: moves are relabelings (torch's
`.to()` of a tensor already on the target device returns it as is) and the accounting still tells what a GPU
would hold where.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from alchemist_worker.activations.records import LayerTensors, SequenceRecord

MAX_TOMBSTONES = 100_000


class Tier(StrEnum):
    DEVICE = "device"
    HOST = "host"
    DROPPED = "dropped"


class DropReason(StrEnum):
    EVICTED = "evicted"  # pushed out of the host tier (oldest first) to make room
    EXPIRED = "expired"  # older than the TTL
    TOO_LARGE = "too_large"  # larger than the host budget on its own
    MISSING = "missing"  # never stored, or forgotten


@dataclass(frozen=True)
class StoreConfig:
    device_budget_bytes: int = 0
    host_budget_bytes: int = 0
    ttl_s: float | None = None
    device: str = "cpu"  # where the device tier lives ("cuda", "cuda:0", or "cpu" without an accelerator)

    def __post_init__(self) -> None:
        if self.device_budget_bytes < 0 or self.host_budget_bytes < 0:
            raise ValueError("byte budgets must be >= 0")
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive or None, got {self.ttl_s}")


@dataclass(frozen=True)
class Lookup:
    record: SequenceRecord | None
    reason: DropReason | None  # why record is None


@dataclass
class StoreStats:
    device_bytes: int
    host_bytes: int
    device_peak_bytes: int
    device_records: int  # records with at least one layer on the device
    host_records: int  # records entirely on the host
    puts: int
    spilled: int  # records moved from the device tier to the host tier to make room
    dropped: dict[str, int] = field(default_factory=dict)  # DropReason -> count


_BufferKey = tuple[int, int]  # device index (-1: the CPU), address of the storage
Buffers = dict[_BufferKey, int]  # distinct storages, with their sizes in bytes


def _buffers(layer: LayerTensors) -> Buffers:
    """The distinct storages a layer's tensors are views of, with their sizes in bytes."""
    buffers: Buffers = {}
    for t in layer.values():
        storage = t.untyped_storage()
        buffers[(t.get_device(), storage.data_ptr())] = storage.nbytes()
    return buffers


def _merged(parts: Iterable[Buffers]) -> Buffers:
    """The distinct storages of several layers' buffers, each once."""
    buffers: Buffers = {}
    for part in parts:
        buffers.update(part)
    return buffers


def _buffers_of(layers: list[LayerTensors]) -> Buffers:
    """The distinct storages of several layers, each once."""
    return _merged(_buffers(layer) for layer in layers)


def _compact(record: SequenceRecord) -> bool:
    """Replaces each tensor that is a view of a larger buffer by a copy of its own elements; True if any was."""
    changed = False
    with torch.inference_mode(False):  # autograd may save the copies later, as it may the views
        for i, layer in enumerate(record.layers):
            if any(t.untyped_storage().nbytes() > t.nbytes for t in layer.values()):
                record.layers[i] = {
                    n: t.clone(memory_format=torch.contiguous_format) for n, t in layer.items()
                }
                changed = True
    return changed


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy, pinned when CUDA exists so later reloads can be asynchronous."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=torch.cuda.is_available())
    host.copy_(tensor)
    return host


class ActivationStore:
    def __init__(self, config: StoreConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.clock = clock
        self._records: OrderedDict[str, SequenceRecord] = OrderedDict()  # oldest first
        self._tiers: dict[str, list[Tier]] = {}  # record id -> tier of each layer
        # record id -> buffers of each layer, as placed (kept, not walked again at every put and eviction)
        self._layer_buffers: dict[str, list[Buffers]] = {}
        self._tombstones: OrderedDict[str, DropReason] = OrderedDict()
        self._in_use: set[str] = set()
        self._bytes = {Tier.DEVICE: 0, Tier.HOST: 0}
        # per tier: buffer -> [how many stored record layers hold it, its bytes]
        self._held: dict[Tier, dict[_BufferKey, list[int]]] = {Tier.DEVICE: {}, Tier.HOST: {}}
        self._device_peak = 0
        self._puts = 0
        self._spilled = 0
        self._dropped: dict[str, int] = {}

    # ---- numbers for gauges ----
    @property
    def device_bytes(self) -> int:
        return self._bytes[Tier.DEVICE]

    @property
    def host_bytes(self) -> int:
        return self._bytes[Tier.HOST]

    @property
    def device_peak_bytes(self) -> int:
        return self._device_peak

    def reset_peak(self) -> None:
        self._device_peak = self._bytes[Tier.DEVICE]

    def stats(self) -> StoreStats:
        device_records = sum(1 for tiers in self._tiers.values() if Tier.DEVICE in tiers)
        return StoreStats(
            device_bytes=self.device_bytes,
            host_bytes=self.host_bytes,
            device_peak_bytes=self._device_peak,
            device_records=device_records,
            host_records=len(self._records) - device_records,
            puts=self._puts,
            spilled=self._spilled,
            dropped=dict(self._dropped),
        )

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, record_id: object) -> bool:
        return record_id in self._records

    # ---- records ----
    def put(self, record_id: str, record: SequenceRecord) -> Tier:
        """Stores `record` (replacing any under the same id) and returns the tier it landed in.

        The store takes the record over: it moves its tensors between tiers in place.
        """
        self.expire()
        if record_id in self._records:
            self._remove(record_id)
        self._tombstones.pop(record_id, None)
        self._puts += 1
        record.created_at = self.clock()
        tier = self._room_for(record)
        if tier is None and _compact(record):  # views of buffers too large to keep whole: keep the rows only
            tier = self._room_for(record)
        if tier is None:
            self._tombstone(record_id, DropReason.TOO_LARGE)
            return Tier.DROPPED
        record.layers = [self._place(layer, tier) for layer in record.layers]
        self._records[record_id] = record
        self._tiers[record_id] = [tier] * record.num_layers
        # after placing: a host copy of a view holds only its rows
        self._layer_buffers[record_id] = [_buffers(layer) for layer in record.layers]
        for buffers in self._layer_buffers[record_id]:
            self._hold(tier, buffers)
        return tier

    def lookup(self, record_id: str) -> Lookup:
        """The record, or why there is none (missing, evicted, expired, too large)."""
        self._expire_one(record_id)
        record = self._records.get(record_id)
        if record is not None:
            return Lookup(record, None)
        return Lookup(None, self._tombstones.get(record_id, DropReason.MISSING))

    def get(self, record_id: str) -> SequenceRecord | None:
        return self.lookup(record_id).record

    def peek(self, record_id: str) -> SequenceRecord:
        """A stored record without a TTL check (for a step that acquired it); KeyError if absent."""
        return self._records[record_id]

    def tier_of(self, record_id: str) -> Tier:
        """DEVICE if any layer is on the device, HOST if all are on the host, DROPPED if not stored."""
        tiers = self._tiers.get(record_id)
        if tiers is None:
            return Tier.DROPPED
        return Tier.DEVICE if Tier.DEVICE in tiers else Tier.HOST

    def layer_tier(self, record_id: str, layer: int) -> Tier:
        return self._tiers[record_id][layer]

    def pop(self, record_id: str) -> SequenceRecord | None:
        """Removes and returns a record (e.g. once a training step consumed it); no tombstone is left."""
        if record_id not in self._records:
            return None
        record = self._records[record_id]
        self._remove(record_id)
        return record

    def acquire(self, record_ids: list[str]) -> None:
        """Marks records in use by a training step: eviction and TTL skip them until `release`."""
        self._in_use.update(r for r in record_ids if r in self._records)

    def release(self, record_ids: list[str]) -> None:
        self._in_use.difference_update(record_ids)

    def move_layer(self, record_id: str, layer: int, tier: Tier, tensors: LayerTensors | None = None) -> None:
        """Puts one layer of a record in `tier`, copying it there unless `tensors` (already there) are given.

        The caller owns the overlap of copies and compute (see activations/transfer.py); the store keeps the
        accounting exact. Budgets are not enforced here: a training step's working set is bounded by design.
        """
        if tier is Tier.DROPPED:
            raise ValueError("drop a record with pop(), not by moving a layer")
        record = self._records[record_id]
        current = self._tiers[record_id][layer]
        if current is tier and tensors is None:
            return
        self._unhold(current, self._layer_buffers[record_id][layer])
        record.layers[layer] = tensors if tensors is not None else self._place(record.layers[layer], tier)
        self._tiers[record_id][layer] = tier
        buffers = _buffers(record.layers[layer])  # a copy may be smaller than a view it replaced
        self._layer_buffers[record_id][layer] = buffers
        self._hold(tier, buffers)

    def hold_working_bytes(self, delta: int) -> None:
        """Counts bytes a training step holds on the device outside records (its own response activations,
        kept from its forward for its backward) in the device tier and its peak, for as long as it holds them."""
        self._add_bytes(Tier.DEVICE, delta)

    def expire(self) -> int:
        """Drops every record older than the TTL; returns how many."""
        if self.config.ttl_s is None:
            return 0
        expired = [rid for rid in self._records if self._is_expired(rid)]
        for rid in expired:
            self._drop(rid, DropReason.EXPIRED)
        return len(expired)

    # ---- internals ----
    def _is_expired(self, record_id: str) -> bool:
        ttl = self.config.ttl_s
        if ttl is None or record_id in self._in_use:
            return False
        return self.clock() - self._records[record_id].created_at > ttl

    def _expire_one(self, record_id: str) -> None:
        if record_id in self._records and self._is_expired(record_id):
            self._drop(record_id, DropReason.EXPIRED)

    def _room_for(self, record: SequenceRecord) -> Tier | None:
        """The first tier with room for what the record holds beyond the buffers already there (room made)."""
        buffers = _buffers_of(record.layers)
        for tier in (Tier.DEVICE, Tier.HOST):
            size = sum(nbytes for key, nbytes in buffers.items() if key not in self._held[tier])
            if size <= self._budget(tier) and self._make_room(tier, size, spare=buffers.keys()):
                return tier
        return None

    def _budget(self, tier: Tier) -> int:
        return self.config.device_budget_bytes if tier is Tier.DEVICE else self.config.host_budget_bytes

    def _make_room(self, tier: Tier, size: int, spare: Collection[_BufferKey] = ()) -> bool:
        """Frees `tier` oldest first until `size` more bytes fit, sparing records that hold a buffer in `spare`
        (the incoming record's, whose size assumed them held); False (nothing moved) if it cannot."""
        budget = self._budget(tier)
        victims: list[str] = []
        released: dict[_BufferKey, int] = {}  # the victims' holds on each buffer
        freed = 0
        for rid in self._records:
            if self._bytes[tier] - freed + size <= budget:
                break
            if rid in self._in_use or tier not in self._tiers[rid]:
                continue
            holds = [key for buffers in self._buffers_in(rid, tier) for key in buffers]
            if any(key in spare for key in holds):
                continue
            victims.append(rid)
            for key in holds:
                released[key] = released.get(key, 0) + 1
                count, nbytes = self._held[tier][key]
                freed += nbytes if released[key] == count else 0  # its last holder goes
        if self._bytes[tier] - freed + size > budget:
            return False
        for rid in victims:
            if tier is Tier.DEVICE:
                self._spill(rid)
            else:
                self._drop(rid, DropReason.EVICTED)
        return True

    def _spill(self, record_id: str) -> None:
        """Device -> host for a whole record; if the host has no room, the record is dropped instead."""
        size = self._bytes_in(record_id, Tier.DEVICE)
        self._in_use.add(record_id)  # not a victim of the room it needs
        fits = self._make_room(Tier.HOST, size)
        self._in_use.discard(record_id)
        if not fits:
            self._drop(record_id, DropReason.EVICTED)
            return
        for layer, tier in enumerate(self._tiers[record_id]):
            if tier is Tier.DEVICE:
                self.move_layer(record_id, layer, Tier.HOST)
        self._spilled += 1

    def _bytes_in(self, record_id: str, tier: Tier) -> int:
        """What the record's layers in `tier` hold, shared or not."""
        return sum(_merged(self._buffers_in(record_id, tier)).values())

    def _buffers_in(self, record_id: str, tier: Tier) -> list[Buffers]:
        """The buffers of each of the record's layers in `tier`."""
        tiers = self._tiers[record_id]
        return [b for b, t in zip(self._layer_buffers[record_id], tiers, strict=True) if t is tier]

    def _hold(self, tier: Tier, buffers: Buffers) -> None:
        held = self._held[tier]
        added = 0
        for key, nbytes in buffers.items():
            if key in held:
                held[key][0] += 1
            else:
                held[key] = [1, nbytes]
                added += nbytes
        self._add_bytes(tier, added)

    def _unhold(self, tier: Tier, buffers: Buffers) -> None:
        held = self._held[tier]
        freed = 0
        for key in buffers:
            held[key][0] -= 1
            if held[key][0] == 0:
                freed += held.pop(key)[1]
        self._add_bytes(tier, -freed)

    def _place(self, layer: LayerTensors, tier: Tier) -> LayerTensors:
        if tier is Tier.DEVICE:
            return {name: t.to(self.device) for name, t in layer.items()}
        return {name: _host_copy(t) for name, t in layer.items()}

    def _drop(self, record_id: str, reason: DropReason) -> None:
        self._remove(record_id)
        self._tombstone(record_id, reason)

    def _tombstone(self, record_id: str, reason: DropReason) -> None:
        self._dropped[reason.value] = self._dropped.get(reason.value, 0) + 1
        self._tombstones[record_id] = reason
        while len(self._tombstones) > MAX_TOMBSTONES:
            self._tombstones.popitem(last=False)

    def _remove(self, record_id: str) -> None:
        del self._records[record_id]
        for buffers, tier in zip(self._layer_buffers.pop(record_id), self._tiers.pop(record_id), strict=True):
            self._unhold(tier, buffers)
        self._in_use.discard(record_id)

    def _add_bytes(self, tier: Tier, delta: int) -> None:
        self._bytes[tier] += delta
        if tier is Tier.DEVICE:
            self._device_peak = max(self._device_peak, self._bytes[Tier.DEVICE])
