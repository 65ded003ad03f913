"""Backward through one prompt layer from its record, recomputing only what the recording policy did not keep.

The prompt's layer l is rebuilt as an autograd graph over the record's tensors. Where the record holds an
operation's output, the operation becomes a "given output" node: its forward returns the recorded value at no
cost and its backward is the usual vector-Jacobian product from saved inputs (a linear layer needs its input
and weight; attention needs q, k, v, its output and the log-sum-exp). Where the record lacks the output, the
operation is simply run again under autograd. The layer's own output is never needed (the next layer's input
is recorded), so down_proj's forward is never run; its backward needs only its input.

The roots of the backward are the layer's output (gradient from the layer above, through the prompt's
residual stream) and its K/V (gradients from the queries of the response, which attended to them); the
result is the gradient of the layer's input, which becomes the output gradient of the layer below.

The wiring mirrors `Block.forward` in model/transformer.py; tests compare the two paths' gradients for every
architecture and policy.
"""

from __future__ import annotations

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
                dx = dx + ctx.scaling * (grad_r @ lora_a)
            if needs[4]:
                da = ctx.scaling * (grad_r.t() @ x)
            if needs[5]:
                db = ctx.scaling * (grad.t() @ (x @ lora_a.t()))
        return dx, None, dweight, dbias, da, db, None


def given_linear(layer: LoRALinear, x: Tensor, output: Tensor | None) -> Tensor:
    """`layer(x)` with a known output (or a placeholder when output is None), differentiable."""
    out = _GivenLinear.apply(x, output, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    return out


class _GivenAttention(torch.autograd.Function):
    """Varlen causal attention whose output and log-sum-exp were recorded: backward from them directly."""

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        cu_seqlens: list[int],
        sliding_window: int | None,
    ) -> Tensor:
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cu_seqlens, ctx.sliding_window = cu_seqlens, sliding_window
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = varlen_attention_backward(
            grad.contiguous(),
            q,
            k,
            v,
            out,
            lse,
            ctx.cu_seqlens,
            ctx.cu_seqlens,
            sliding_window=ctx.sliding_window,
        )
        return dq, dk, dv, None, None, None, None


def replay_layer_backward(
    block: Block,
    record: LayerTensors,
    cos: Tensor,
    sin: Tensor,
    cu_seqlens: list[int],
    *,
    grad_output: Tensor | None,
    grad_k: Tensor,
    grad_v: Tensor,
    sliding_window: int | None,
    need_grad_input: bool = True,
) -> Tensor | None:
    """Backward through `block` over prompt tokens from their record; accumulates parameter gradients.

    record: this layer's fields over the flat prompt batch [P, ...]; cos, sin: RoPE of the prompt positions;
    grad_output: d loss / d layer output [P, hidden], or None when nothing above reads the prompt's output
    (the top layer); grad_k, grad_v: [P, n_kv_heads, head_dim] from the response's attention.
    Returns d loss / d layer input [P, hidden] (None unless need_grad_input).
    """
    attn, mlp = block.self_attn, block.mlp
    with torch.enable_grad():
        x = record["x"].detach().requires_grad_(need_grad_input)
        xn = block.input_layernorm(x)
        num_tokens = x.shape[0]
        v = given_linear(attn.v_proj, xn, record["v"].flatten(1)).view_as(record["v"])
        if "k_lin" in record:
            k_lin = given_linear(attn.k_proj, xn, record["k_lin"])
        elif attn.k_norm is not None:  # QK norm cannot be undone: recompute the projection
            k_lin = attn.k_proj(xn)
        else:  # undo RoPE on the recorded K to get the projection's output without the matmul
            k_lin = given_linear(attn.k_proj, xn, unapply_rope(record["k"], cos, sin).flatten(1))
        k = attn.shape_k(k_lin, cos, sin)
        if grad_output is None:
            roots, grads = [k, v], [grad_k, grad_v]
        else:
            q_lin = given_linear(attn.q_proj, xn, record["q_lin"]) if "q_lin" in record else attn.q_proj(xn)
            q = attn.shape_q(q_lin, cos, sin)
            if "attn" in record:
                out = _GivenAttention.apply(
                    q, k, v, record["attn"], record["lse"], cu_seqlens, sliding_window
                )
            else:
                out, _ = varlen_attention(q, k, v, cu_seqlens, cu_seqlens, sliding_window=sliding_window)
            out = out.reshape(num_tokens, -1)
            o = given_linear(attn.o_proj, out, record["o"]) if "o" in record else attn.o_proj(out)
            h = x + o
            hn = block.post_attention_layernorm(h)
            gate = given_linear(mlp.gate_proj, hn, record["gate"]) if "gate" in record else mlp.gate_proj(hn)
            up = given_linear(mlp.up_proj, hn, record["up"]) if "up" in record else mlp.up_proj(hn)
            down = given_linear(mlp.down_proj, F.silu(gate) * up, None)  # value unused
            roots, grads = [h, down, k, v], [grad_output, grad_output, grad_k, grad_v]
        live = [(r, g) for r, g in zip(roots, grads, strict=True) if r.requires_grad]
        if live:  # nothing requires grad in a frozen layer whose input gradient is not wanted
            torch.autograd.backward([r for r, _ in live], [g for _, g in live])
    return x.grad if need_grad_input else None
