"""Recording policies: which of a layer's prefill activations are kept for training.

They trade bytes moved for FLOPs saved in the training step's backward through the prompt:

- `kv`: the layer input and K/V. The prompt's layer is recomputed in backward (q, attention forward, o_proj,
  gate/up), as activation checkpointing would, except for the K/V projections' outputs.
- `selective`: adds the attention output and the softmax log-sum-exp, so prompt attention is never run
  forward again (its backward uses them directly); q, o_proj and gate/up are recomputed.
- `full`: adds every projection output backward needs (q, o, gate, up; and k before QK norm for Qwen3), so
  no matmul or attention of the base model is recomputed. What is still rebuilt from the record is
  elementwise only: the two RMSNorm outputs and SwiGLU's product (each O(tokens x width), kept out of the
  record because storing them would cost more bytes than rebuilding costs time), and LoRA's rank-r
  down-projections (x A^T, a matmul of rank r).

No policy needs the layer's output: it is the next layer's recorded input.
"""

from __future__ import annotations

from enum import StrEnum


class RecordingPolicy(StrEnum):
    KV = "kv"
    SELECTIVE = "selective"
    FULL = "full"

    @property
    def wants_lse(self) -> bool:
        return self is not RecordingPolicy.KV

    def fields(self, qk_norm: bool) -> tuple[str, ...]:
        """Names of the `LayerActivations` fields this policy keeps, for a model with or without QK norm."""
        kept = ["x", "k", "v"]
        if self is not RecordingPolicy.KV:
            kept += ["attn", "lse"]
        if self is RecordingPolicy.FULL:
            kept += ["q_lin", "o", "gate", "up"]
            if qk_norm:  # the QK-norm backward needs k before the norm, which K (after it) cannot give back
                kept.append("k_lin")
        return tuple(kept)


def parse_policy(value: str | RecordingPolicy) -> RecordingPolicy:
    try:
        return RecordingPolicy(value)
    except ValueError:
        options = ", ".join(p.value for p in RecordingPolicy)
        raise ValueError(f"unknown recording policy {value!r}; choose one of: {options}") from None
