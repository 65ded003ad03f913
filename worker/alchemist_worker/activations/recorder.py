"""The prefill recorder: turns the per-layer hook calls of one prefill forward into per-sequence records.

The engine builds one `PrefillRecorder` per recorded prefill step (explicit per-step state, never global),
passes it as `recorder=` to `Transformer.forward`, then collects `records()`:

    recorder = PrefillRecorder(policy, cu_seqlens, input_ids, num_layers=..., version=v, keep=[True, False])
    hidden = model(input_ids, positions, backend, recorder=recorder)
    for seq, record in zip(batch, recorder.records()):
        if record is not None:
            store.put(seq.request_id, record)

Only the sequences marked in `keep` are kept (recording is sampled), and only the fields the policy keeps.
Copying is the whole cost of recording, everything else was computed by the forward anyway, so a recorder
copies as little as it can: when the kept sequences together own (nearly) all rows of the tensors the forward
handed over (`LayerActivations.handed_over`), each record keeps views of them instead of copies. The records of
one step then share its buffers; the store counts each buffer once and frees it with its last record. Kept
tensors are never inference tensors, so that autograd can later save them for backward even if the engine's
forward ran under `torch.inference_mode()`.

The copies that remain (a sampled prompt beside unsampled ones) leave the forward's critical path: on CUDA
they run on a side stream (`copy_stream`); on a CPU a `CopyThread` makes them while the forward goes on to the
next layers, one single-threaded copy at a time (the forward keeps its cores' threads), and `records()` waits
for both.

Two options trade exactness or serving work for less: `defer_lse` leaves the softmax log-sum-exp out of the
record (the trainer computes it when a record is used, which most never are), for engines whose attention
does not return it; `record_dtype` stores records in another dtype (e.g. bfloat16, half the bytes; the
log-sum-exp stays fp32), which makes gradients from them approximate.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.activations.records import LayerTensors, SequenceRecord
from alchemist_worker.model.attention import CuSeqlens, as_offsets
from alchemist_worker.model.layer_activations import LayerActivations

# Kept sequences whose rows are at least this share of a handed-over buffer are kept as views of it: the
# other rows' bytes (a few decode rows beside a prompt, a prompt not sampled) are held too, and counted, but
# not copied.
MIN_VIEW_SHARE = 0.875


class CopyThread:
    """A background thread for a CPU recorder's copies. Each copy runs on one thread, outside torch's
    intra-op pool, so it does not oversubscribe the cores the forward's threads hold (setting torch's thread
    count from another thread would change the process's default for threads started later)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="record-copies")

    def submit(self, rows: dict[int, LayerTensors]) -> Future[dict[int, LayerTensors]]:
        """Contiguous copies of each sequence's rows (views of tensors the forward no longer writes), made in
        the background: {sequence: {field: copy}}. The copies' memory is allocated here, on the calling thread:
        memory a thread frees goes back to the allocator's pool of the thread that allocated it, so records
        allocated on the engine's thread reuse the memory of the records the store evicted there, where the
        copy thread's own allocations would be new pages (page faults) every time."""
        with torch.inference_mode(False):
            pairs = {
                seq: {name: (t, torch.empty(t.shape, dtype=t.dtype)) for name, t in tensors.items()}
                for seq, tensors in rows.items()
            }
        return self._pool.submit(_copy_all, pairs)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _copy_all(pairs: dict[int, dict[str, tuple[Tensor, Tensor]]]) -> dict[int, LayerTensors]:
    with torch.inference_mode(False):
        for tensors in pairs.values():
            for source, copy in tensors.values():
                _plain_copy(source, copy)
    return {seq: {name: copy for name, (_, copy) in tensors.items()} for seq, tensors in pairs.items()}


def _plain_copy(source: Tensor, into: Tensor) -> None:
    """Copies by numpy, which runs on the calling thread alone and releases the GIL; the bytes are copied as
    integers of the element's size, so any dtype (bfloat16 too) goes through."""
    raw = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[source.element_size()]
    np.copyto(into.view(raw).numpy(), source.view(raw).numpy())


def _alias(tensor: Tensor) -> Tensor:
    """The same memory as a tensor that autograd may save (an inference tensor cannot be)."""
    if not tensor.is_inference():
        return tensor.detach()
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


class PrefillRecorder:
    def __init__(
        self,
        policy: RecordingPolicy,
        cu_seqlens: CuSeqlens,
        input_ids: Tensor,
        *,
        num_layers: int,
        version: int,
        qk_norm: bool = False,
        keep: Sequence[bool] | None = None,
        start_positions: Sequence[int] | None = None,
        copy_stream: torch.cuda.Stream | None = None,
        copy_thread: CopyThread | None = None,
        defer_lse: bool = False,
        record_dtype: torch.dtype | None = None,
    ) -> None:
        """`copy_stream` (CUDA) or `copy_thread` (CPU): the copies run there, beside the forward's next layers;
        `records()` waits for them."""
        self.policy = policy
        self.copy_stream = copy_stream
        self.copy_thread = copy_thread
        self._background: list[tuple[int, Future[dict[int, LayerTensors]]]] = []  # (layer, copies)
        self.record_dtype = record_dtype
        self.offsets = as_offsets(cu_seqlens)
        num_seqs = len(self.offsets) - 1
        self.keep = list(keep) if keep is not None else [True] * num_seqs
        if len(self.keep) != num_seqs:
            raise ValueError(f"keep has {len(self.keep)} entries for {num_seqs} sequences")
        self.start_positions = list(start_positions) if start_positions is not None else [0] * num_seqs
        self.defer_lse = defer_lse
        self.fields = tuple(f for f in policy.fields(qk_norm) if not (defer_lse and f == "lse"))
        self.qk_norm = qk_norm
        self.version = version
        self.num_layers = num_layers
        self.token_ids = input_ids.detach().to("cpu", torch.int64)
        # per kept sequence, per layer: field -> tensor
        self._layers: dict[int, list[LayerTensors | None]] = {
            i: [None] * num_layers for i in range(num_seqs) if self.keep[i]
        }

    @property
    def wants_lse(self) -> bool:
        return self.policy.wants_lse and not self.defer_lse

    def record_layer(self, layer: int, activations: LayerActivations) -> None:
        tensors: LayerTensors = {}
        for name in self.fields:
            tensor = getattr(activations, name)
            if tensor is None:
                raise RuntimeError(f"policy {self.policy.value} needs {name} but layer {layer} gave none")
            tensors[name] = tensor
        viewed = self._viewable(tensors, activations.handed_over)
        copied = {name: t for name, t in tensors.items() if name not in viewed}
        with torch.inference_mode(False), torch.no_grad():
            aliases = {name: _alias(tensors[name]) for name in viewed}
            for seq, layers in self._layers.items():
                layers[layer] = {name: alias[self._rows(seq)] for name, alias in aliases.items()}
        if copied and self.copy_thread is not None:
            copied = self._copy_in_background(layer, copied, activations.handed_over)
        if not copied:
            return
        stream = self.copy_stream
        if stream is None:
            self._copy(layer, copied)
            return
        stream.wait_stream(torch.cuda.current_stream(stream.device))  # the layer's tensors are written
        with torch.cuda.stream(stream):
            self._copy(layer, copied)
        for tensor in copied.values():  # their memory is not reused before the side stream has read it
            if tensor.is_cuda:
                tensor.record_stream(stream)

    def _copy_in_background(
        self, layer: int, tensors: LayerTensors, handed_over: frozenset[str]
    ) -> LayerTensors:
        """Hands the copies the copy thread can make to it; returns the rest (to copy now): fields the forward
        may still write, and fields whose dtype changes (a converting copy would need torch's threads)."""
        assert self.copy_thread is not None
        later = {
            name: t
            for name, t in tensors.items()
            if self._usable_as_is(name, t, handed_over) and t.device.type == "cpu"
        }
        if later:
            rows = {seq: {name: t[self._rows(seq)] for name, t in later.items()} for seq in self._layers}
            self._background.append((layer, self.copy_thread.submit(rows)))
        return {name: t for name, t in tensors.items() if name not in later}

    def _viewable(self, tensors: LayerTensors, handed_over: frozenset[str]) -> set[str]:
        """Fields kept as views: handed over, in the record's dtype, and mostly the kept sequences' rows."""
        rows = sum(self.offsets[seq + 1] - self.offsets[seq] for seq in self._layers)
        if rows == 0:
            return set()
        by_storage: dict[int, list[str]] = {}
        for name, t in tensors.items():
            if self._usable_as_is(name, t, handed_over):
                by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(name)
        viewed: set[str] = set()
        for names in by_storage.values():
            storage = tensors[names[0]].untyped_storage().nbytes()
            kept = sum(tensors[n].nbytes * rows // max(tensors[n].shape[0], 1) for n in names)
            if storage and kept >= MIN_VIEW_SHARE * storage:
                viewed.update(names)
        return viewed

    def _rows(self, seq: int) -> slice:
        return slice(self.offsets[seq], self.offsets[seq + 1])

    def _usable_as_is(self, name: str, tensor: Tensor, handed_over: frozenset[str]) -> bool:
        """The forward writes the field no more and it is in the record's dtype: its memory may be read later
        (kept as a view, or copied off the critical path)."""
        return name in handed_over and tensor.dtype == self._dtype_of(name, tensor)

    def _dtype_of(self, name: str, tensor: Tensor) -> torch.dtype:
        if self.record_dtype is None or name == "lse" or not tensor.is_floating_point():
            return tensor.dtype
        return self.record_dtype

    def _copy(self, layer: int, tensors: LayerTensors) -> None:
        with torch.inference_mode(False), torch.no_grad():
            for seq, layers in self._layers.items():
                kept = layers[layer] if layers[layer] is not None else {}
                assert kept is not None
                for name, tensor in tensors.items():
                    kept[name] = tensor[self._rows(seq)].to(
                        self._dtype_of(name, tensor), memory_format=torch.contiguous_format, copy=True
                    )
                layers[layer] = kept

    def records(self) -> list[SequenceRecord | None]:
        """Per sequence of the batch: its record, or None where `keep` said not to record it."""
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.copy_stream.device).wait_stream(self.copy_stream)
        background, self._background = self._background, []
        for layer, copies in background:
            for seq, tensors in copies.result().items():
                kept = self._layers[seq][layer]
                self._layers[seq][layer] = tensors if kept is None else {**kept, **tensors}
        out: list[SequenceRecord | None] = []
        for seq in range(len(self.offsets) - 1):
            layers = self._layers.get(seq)
            if layers is None:
                out.append(None)
                continue
            missing = [i for i, layer in enumerate(layers) if layer is None]
            if missing:
                raise RuntimeError(
                    f"layers {missing} were never recorded; was the forward run with this recorder?"
                )
            out.append(
                SequenceRecord(
                    policy=self.policy,
                    version=self.version,
                    token_ids=self.token_ids[self._rows(seq)].clone(),
                    layers=[layer for layer in layers if layer is not None],
                    start_position=self.start_positions[seq],
                    qk_norm=self.qk_norm,
                )
            )
        return out
