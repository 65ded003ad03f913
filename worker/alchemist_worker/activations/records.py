"""A sequence's record: what one prompt's prefill kept, layer by layer, under one policy and weight version.

Each layer's tensors form a dict keyed by `LayerActivations` field names, [p, ...] over the prompt's p tokens
(lse is fp32, the others are in the model's dtype or the configured record dtype). Layers are separate so a
training step can move them between the device and the host one at a time. A record may lack the log-sum-exp
its policy keeps (`lse_deferred`): the engine's attention did not return it and the trainer computes it.
A tensor may be a view of a slightly larger buffer of the forward (see recorder.py); byte counts are of the
memory held, each buffer once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from alchemist_worker.activations.policy import RecordingPolicy

LayerTensors = dict[str, Tensor]


@dataclass
class SequenceRecord:
    policy: RecordingPolicy
    version: int  # weight version the prefill ran under
    token_ids: Tensor  # [p] int64 on the CPU: the prompt tokens the record covers
    layers: list[LayerTensors]
    start_position: int = 0  # position of token_ids[0]; a record usable for training starts at 0
    qk_norm: bool = False  # recorded by a model with QK norm (decides which fields `policy` implies)
    created_at: float = field(default=0.0)  # store clock time of put(), set by the store

    def __post_init__(self) -> None:
        expected = set(self.policy.fields(self.qk_norm))
        p = int(self.token_ids.shape[0])
        for i, layer in enumerate(self.layers):
            if set(layer) != expected and set(layer) | {"lse"} != expected:
                raise ValueError(
                    f"layer {i} holds {sorted(layer)} but policy {self.policy.value} keeps {sorted(expected)}"
                )
            wrong = {name: tuple(t.shape) for name, t in layer.items() if t.shape[0] != p}
            if wrong:
                raise ValueError(f"layer {i} tensors {wrong} do not cover the record's {p} tokens")

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def lse_deferred(self) -> bool:
        """True when the policy keeps the log-sum-exp but the record does not hold it (computed in training)."""
        return self.policy.wants_lse and any("lse" not in layer for layer in self.layers)

    def layer_nbytes(self, layer: int) -> int:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in self.layers[layer].values()}
        return sum(s.nbytes() for s in storages.values())

    def nbytes(self) -> int:
        """Bytes of activation tensors (the token ids, kept on the CPU, are not counted)."""
        return sum(self.layer_nbytes(i) for i in range(self.num_layers))


def concat_records(chunks: list[SequenceRecord]) -> SequenceRecord:
    """One record from the records of consecutive prefill chunks of the same prompt (chunked prefill)."""
    if not chunks:
        raise ValueError("no records to concatenate")
    first = chunks[0]
    if len(chunks) == 1:
        return first  # a prompt prefilled in one step: nothing to copy
    position = first.start_position
    for chunk in chunks:
        if (chunk.policy, chunk.version, chunk.num_layers) != (first.policy, first.version, first.num_layers):
            raise ValueError("chunks differ in policy, version or layer count")
        if chunk.start_position != position:
            raise ValueError(f"chunk starts at position {chunk.start_position}, expected {position}")
        position += chunk.num_tokens
    layers = [
        {name: torch.cat([c.layers[i][name] for c in chunks]) for name in first.layers[i]}
        for i in range(first.num_layers)
    ]
    return SequenceRecord(
        policy=first.policy,
        version=first.version,
        token_ids=torch.cat([c.token_ids for c in chunks]),
        layers=layers,
        start_position=first.start_position,
        qk_norm=first.qk_norm,
    )
