"""What a decoder layer hands to a recorder during a prefill forward, and the recorder's side of the contract.

`Transformer.forward(..., recorder=r)` calls `r.record_layer(layer, activations)` once per layer with
references to tensors the layer computed anyway (whole-batch, [T, ...] over the flat token batch), so the
hook itself costs nothing; the recorder decides what to copy (see activations/recorder.py). `handed_over`
names the tensors the forward never writes again: a recorder may keep those by reference instead of copying
them. With recorder=None, as in every decode step, nothing is collected and no softmax statistics are requested.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor


@dataclass(frozen=True)
class LayerActivations:
    """One layer's intermediate tensors over a flat batch of T tokens (bias included in projections)."""

    x: Tensor  # [T, hidden] the layer's input (residual stream)
    q_lin: Tensor  # [T, n_heads * head_dim] q_proj output, before QK norm and RoPE
    k_lin: Tensor  # [T, n_kv_heads * head_dim] k_proj output, before QK norm and RoPE
    k: Tensor  # [T, n_kv_heads, head_dim] keys as attention saw them (after QK norm and RoPE)
    v: Tensor  # [T, n_kv_heads, head_dim]
    attn: Tensor  # [T, n_heads, head_dim] attention output, before o_proj
    lse: Tensor | None  # [T, n_heads] fp32 softmax log-sum-exp (only when the recorder wants it)
    o: Tensor  # [T, hidden] o_proj output (the attention's residual update)
    gate: Tensor  # [T, intermediate] gate_proj output
    up: Tensor  # [T, intermediate] up_proj output
    handed_over: frozenset[str] = field(default=frozenset())  # fields nothing writes after this call


class Recorder(Protocol):
    @property
    def wants_lse(self) -> bool:
        """True when the recording policy keeps softmax statistics, so attention must return them."""
        ...

    def record_layer(self, layer: int, activations: LayerActivations) -> None: ...
