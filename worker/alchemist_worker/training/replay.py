"""Backward through one layer over prompt and response tokens together, from what their forwards kept.

By the time a layer is replayed, every activation its backward needs is known: the prompt's from the prefill
record, the response's from the step's own forward (run without autograd). The layer is rebuilt as an autograd
graph over those tensors in which each operation whose output is known becomes a "given output" node: its
forward returns the known value at no cost and its backward is the usual vector-Jacobian product from saved
inputs (a linear layer needs its input and weight; attention needs q, k, v, its output and the log-sum-exp;
RoPE needs nothing, its transpose is the inverse rotation). An operation whose output the record lacks (the
`kv` and `selective` policies) is simply run again under autograd. The layer's own output is never needed,
so down_proj's forward is never run; its backward needs only its input.

Prompt and response rows go through one backward, so the response's rows join the prompt's in every matmul
instead of running as thin matmuls of their own. Rows are laid out sequence by sequence (prompt prefix, then
response, per sample), so attention's backward is the ordinary causal one over whole sequences and gives the
prompt's K/V their gradient from the response's queries directly.

At the top layer the prompt's outputs feed nothing: only the response's rows ("query rows") go through the
queries, attention output, o_proj and MLP, while K/V (and the input norm under them) cover every row.

The wiring mirrors `Block.forward` in model/transformer.py; tests compare the result with a forward and
backward over prompt + response for every architecture and policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from alchemist_worker.activations.records import LayerTensors
from alchemist_worker.model.attention import varlen_attention, varlen_attention_backward
from alchemist_worker.model.layers import LoRALinear, unapply_rope
from alchemist_worker.model.transformer import Block


class _GivenLinear(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T whose value is known (or not needed): only its backward runs."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        output: Tensor | None,
        weight: Tensor,
        bias: Tensor | None,
        lora_a: Tensor | None,
        lora_b: Tensor | None,
        scaling: float,
    ) -> Tensor:
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        if output is None:  # a placeholder: nobody reads the value, only the gradient flows
            return x.new_zeros(1, 1).expand(x.shape[0], weight.shape[0])
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, lora_a, lora_b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx = grad @ weight if needs[0] else None  # [T, in]
        dweight = grad.t() @ x if needs[2] else None
        dbias = grad.sum(0) if ctx.has_bias and needs[3] else None
        da = db = None
        if lora_a is not None and lora_b is not None:
            grad_r = grad @ lora_b  # [T, r]
            if dx is not None:
                dx = torch.addmm(dx, grad_r, lora_a, alpha=ctx.scaling)
            if needs[4]:
                da = ctx.scaling * (grad_r.t() @ x)
            if needs[5]:
                db = ctx.scaling * (grad.t() @ (x @ lora_a.t()))
        return dx, None, dweight, dbias, da, db, None


def given_linear(layer: LoRALinear, x: Tensor, output: Tensor | None) -> Tensor:
    """`layer(x)` with a known output (or a placeholder when output is None), differentiable."""
    out = _GivenLinear.apply(x, output, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    return out


class _GivenRope(torch.autograd.Function):
    """apply_rope(x) whose value is known: RoPE is a rotation, so its backward is the inverse rotation."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, output: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        return unapply_rope(grad, cos, sin), None, None, None


class _GivenAttention(torch.autograd.Function):
    """Varlen causal attention whose output and log-sum-exp are known: backward from them directly."""

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        cu_seqlens_q: list[int],
        cu_seqlens_k: list[int],
        sliding_window: int | None,
    ) -> Tensor:
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cu_q, ctx.cu_k, ctx.sliding_window = cu_seqlens_q, cu_seqlens_k, sliding_window
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = varlen_attention_backward(
            grad.contiguous(), q, k, v, out, lse, ctx.cu_q, ctx.cu_k, sliding_window=ctx.sliding_window
        )
        return dq, dk, dv, None, None, None, None, None


@dataclass(frozen=True)
class LayerRows:
    """Where a layer's rows sit: all rows (prompt prefixes and responses, sequence by sequence) feed K/V;
    the query rows (all of them, or only the responses' at the top layer) feed everything else."""

    cos: Tensor  # [T, 1, head_dim / 2] RoPE of every row
    sin: Tensor
    cu_seqlens: list[int]  # [n + 1] sequences over all T rows
    query_rows: Tensor | None = None  # [Q] indices into the T rows; None: every row
    cu_seqlens_q: list[int] | None = None  # [n + 1] sequences over the Q query rows (with query_rows)


def replay_layer_backward(
    block: Block,
    keys: LayerTensors,
    queries: LayerTensors,
    rows: LayerRows,
    *,
    grad_output: Tensor,
    sliding_window: int | None,
    need_grad_input: bool = True,
) -> Tensor | None:
    """Backward through `block` from known activations; accumulates parameter gradients.

    keys: fields over all T rows: x, k, v (and k_lin, kept for QK-norm models); queries: the fields known over
    the Q query rows, of q_lin, attn, lse, o, gate, up (the missing ones are recomputed); grad_output:
    d loss / d layer output [Q, hidden]. Returns d loss / d layer input [T, hidden] (None unless need_grad_input).
    """
    attn, mlp = block.self_attn, block.mlp
    with torch.enable_grad():
        x = keys["x"].detach().requires_grad_(need_grad_input)
        xn = block.input_layernorm(x)
        v = given_linear(attn.v_proj, xn, keys["v"].flatten(1)).view_as(keys["v"])
        if attn.k_norm is None:  # K is the rotated projection: neither the matmul nor RoPE runs again
            k = _GivenRope.apply(
                given_linear(attn.k_proj, xn, None).view_as(keys["k"]), keys["k"], rows.cos, rows.sin
            )
        else:  # QK norm: rebuild the norm (and RoPE) from the projection's output, recorded or recomputed
            k_lin = given_linear(attn.k_proj, xn, keys["k_lin"]) if "k_lin" in keys else attn.k_proj(xn)
            k = attn.shape_k(k_lin, rows.cos, rows.sin)
        if rows.query_rows is None:
            x_q, xn_q, cos_q, sin_q, cu_q = x, xn, rows.cos, rows.sin, rows.cu_seqlens
        else:
            x_q, xn_q = x.index_select(0, rows.query_rows), xn.index_select(0, rows.query_rows)
            cos_q, sin_q = rows.cos[rows.query_rows], rows.sin[rows.query_rows]
            assert rows.cu_seqlens_q is not None
            cu_q = rows.cu_seqlens_q
        q_lin = given_linear(attn.q_proj, xn_q, queries["q_lin"]) if "q_lin" in queries else attn.q_proj(xn_q)
        q = attn.shape_q(q_lin, cos_q, sin_q)
        if "attn" in queries:
            lse = queries.get("lse")
            if lse is None:  # a record that deferred it (vLLM's attention does not return it)
                with torch.no_grad():
                    _, lse = varlen_attention(
                        q, k, v, cu_q, rows.cu_seqlens, sliding_window=sliding_window, need_lse=True
                    )
            out = _GivenAttention.apply(q, k, v, queries["attn"], lse, cu_q, rows.cu_seqlens, sliding_window)
        else:
            out, _ = varlen_attention(q, k, v, cu_q, rows.cu_seqlens, sliding_window=sliding_window)
        out = out.reshape(x_q.shape[0], -1)
        o = given_linear(attn.o_proj, out, queries["o"]) if "o" in queries else attn.o_proj(out)
        h = x_q + o
        hn = block.post_attention_layernorm(h)
        gate = given_linear(mlp.gate_proj, hn, queries["gate"]) if "gate" in queries else mlp.gate_proj(hn)
        up = given_linear(mlp.up_proj, hn, queries["up"]) if "up" in queries else mlp.up_proj(hn)
        down = given_linear(mlp.down_proj, F.silu(gate) * up, None)  # value unused
        live = [r for r in (h, down) if r.requires_grad]
        if live:  # nothing requires grad in a frozen layer whose input gradient is not wanted
            torch.autograd.backward(live, [grad_output] * len(live))
    return x.grad if need_grad_input else None
