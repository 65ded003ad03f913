"""The prefill recorder: turns the per-layer hook calls of one prefill forward into per-sequence records.

The engine builds one `PrefillRecorder` per recorded prefill step (explicit per-step state, never global),
passes it as `recorder=` to `Transformer.forward`, then collects `records()`:

    recorder = PrefillRecorder(policy, cu_seqlens, input_ids, num_layers=..., version=v, keep=[True, False])
    hidden = model(input_ids, positions, backend, recorder=recorder)
    for seq, record in zip(batch, recorder.records()):
        if record is not None:
            store.put(seq.request_id, record)

Only the sequences marked in `keep` are copied (recording is sampled), and only the fields the policy keeps.
The copy is the whole cost of recording; everything else was computed by the forward anyway. Copies are made
outside inference mode so that autograd can later save them for backward even if the engine's forward ran
under `torch.inference_mode()`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.activations.records import LayerTensors, SequenceRecord
from alchemist_worker.model.attention import CuSeqlens, as_offsets
from alchemist_worker.model.layer_activations import LayerActivations


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
    ) -> None:
        """`copy_stream` (CUDA): the copies run there, beside the forward's next layers; `records()` waits."""
        self.policy = policy
        self.copy_stream = copy_stream
        self.offsets = as_offsets(cu_seqlens)
        num_seqs = len(self.offsets) - 1
        self.keep = list(keep) if keep is not None else [True] * num_seqs
        if len(self.keep) != num_seqs:
            raise ValueError(f"keep has {len(self.keep)} entries for {num_seqs} sequences")
        self.start_positions = list(start_positions) if start_positions is not None else [0] * num_seqs
        self.fields = policy.fields(qk_norm)
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
        return self.policy.wants_lse

    def record_layer(self, layer: int, activations: LayerActivations) -> None:
        stream = self.copy_stream
        if stream is None:
            self._copy(layer, activations)
            return
        stream.wait_stream(torch.cuda.current_stream(stream.device))  # the layer's tensors are written
        with torch.cuda.stream(stream):
            self._copy(layer, activations)
        for name in self.fields:  # their memory is not reused before the side stream has read it
            tensor = getattr(activations, name)
            if tensor is not None and tensor.is_cuda:
                tensor.record_stream(stream)

    def _copy(self, layer: int, activations: LayerActivations) -> None:
        with torch.inference_mode(False), torch.no_grad():
            for seq, layers in self._layers.items():
                start, end = self.offsets[seq], self.offsets[seq + 1]
                kept: LayerTensors = {}
                for name in self.fields:
                    tensor = getattr(activations, name)
                    if tensor is None:
                        raise RuntimeError(
                            f"policy {self.policy.value} needs {name} but layer {layer} gave none"
                        )
                    kept[name] = tensor[start:end].detach().clone(memory_format=torch.contiguous_format)
                layers[layer] = kept

    def records(self) -> list[SequenceRecord | None]:
        """Per sequence of the batch: its record, or None where `keep` said not to record it."""
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.copy_stream.device).wait_stream(self.copy_stream)
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
                    token_ids=self.token_ids[self.offsets[seq] : self.offsets[seq + 1]].clone(),
                    layers=[layer for layer in layers if layer is not None],
                    start_position=self.start_positions[seq],
                    qk_norm=self.qk_norm,
                )
            )
        return out
