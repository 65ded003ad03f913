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
from alchemist_worker.model.layers import LoRALinear, apply_rope
from alchemist_worker.model.transformer import Block


class _GivenLinears(torch.autograd.Function):
    """y_i = x W_i^T + b_i + s (x A_i^T) B_i^T for linear layers sharing the input x (q/k/v, gate/up), whose
    values are known (or not needed): only their backward runs.

    The adapters of the group are handled together: x A^T and the gradient of A take one matmul each over x for
    all of them, and their share of dx one more, instead of one per layer (rank-r matmuls cost what they read of x,
    not their FLOPs). Arguments after x and the group size: outputs, weights, biases, A, B,
    n of each (an output None is a placeholder: nobody reads its value, only its gradient flows)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, n: int, scaling: float, *tensors: Tensor | None) -> tuple[Tensor, ...]:
        outputs, weights, biases, lora_a, lora_b = (tensors[i * n : (i + 1) * n] for i in range(5))
        ctx.n, ctx.scaling = n, scaling
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(x, *weights, *lora_a, *lora_b)
        placeholder = x.new_zeros(1, 1)
        values = []
        for out, weight in zip(outputs, weights, strict=True):
            assert weight is not None
            values.append(
                out.view_as(out) if out is not None else placeholder.expand(x.shape[0], weight.shape[0])
            )
        return tuple(values)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        n, scaling = ctx.n, ctx.scaling
        x, *saved = ctx.saved_tensors
        weights, lora_a, lora_b = saved[:n], saved[n : 2 * n], saved[2 * n :]
        needs = ctx.needs_input_grad  # x, n, scaling, then outputs, weights, biases, A, B
        needs_w, needs_b = needs[3 + n : 3 + 2 * n], needs[3 + 2 * n : 3 + 3 * n]
        needs_a, needs_lb = needs[3 + 3 * n : 3 + 4 * n], needs[3 + 4 * n : 3 + 5 * n]
        dx: Tensor | None = None
        dweights: list[Tensor | None] = [None] * n
        dbiases: list[Tensor | None] = [None] * n
        for i, (grad, weight) in enumerate(zip(grads, weights, strict=True)):
            if needs[0]:
                dx = grad @ weight if dx is None else dx.addmm_(grad, weight)
            if needs_w[i]:
                dweights[i] = grad.t() @ x
            if ctx.has_bias[i] and needs_b[i]:
                dbiases[i] = grad.sum(0)
        da: list[Tensor | None] = [None] * n
        db: list[Tensor | None] = [None] * n
        adapted = [i for i in range(n) if lora_a[i] is not None and lora_b[i] is not None]
        if adapted:
            a_cat = torch.cat([lora_a[i] for i in adapted])  # [k r, in]
            ranks = [lora_a[i].shape[0] for i in adapted]
            grad_r = torch.cat([grads[i] @ lora_b[i] for i in adapted], dim=1)  # [T, k r]
            if dx is not None:
                dx = dx.addmm_(grad_r, a_cat, alpha=scaling)
            if any(needs_a[i] for i in adapted):
                da_cat = scaling * (grad_r.t() @ x)
                for i, part in zip(adapted, da_cat.split(ranks), strict=True):
                    da[i] = part if needs_a[i] else None
            if any(needs_lb[i] for i in adapted):
                xa = (x @ a_cat.t()).split(ranks, dim=1)  # x A_i^T
                for i, part in zip(adapted, xa, strict=True):
                    db[i] = scaling * (part.t() @ grads[i]).t() if needs_lb[i] else None
        return (dx, None, None, *([None] * n), *dweights, *dbiases, *da, *db)


def given_linears(layers: list[LoRALinear], x: Tensor, outputs: list[Tensor | None]) -> list[Tensor]:
    """`[layer(x) for layer in layers]` with known outputs (or placeholders where None), differentiable."""
    scalings = {layer.scaling for layer in layers if layer.has_adapter}
    if len(scalings) > 1:  # adapters of one configuration share it; others go one by one
        return [given_linears([layer], x, [out])[0] for layer, out in zip(layers, outputs, strict=True)]
    tensors = [
        *outputs,
        *(layer.weight for layer in layers),
        *(layer.bias for layer in layers),
        *(layer.lora_A for layer in layers),
        *(layer.lora_B for layer in layers),
    ]
    return list(_GivenLinears.apply(x, len(layers), scalings.pop() if scalings else 1.0, *tensors))


def given_linear(layer: LoRALinear, x: Tensor, output: Tensor | None) -> Tensor:
    """`layer(x)` with a known output (or a placeholder when output is None), differentiable."""
    return given_linears([layer], x, [output])[0]


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
        # Projections of xn whose outputs are known go through one backward together: V, K (without QK norm
        # K is the rotated projection, so its output is not needed: neither the matmul nor RoPE runs again),
        # and Q where every row queries.
        given = [attn.v_proj]
        outputs: list[Tensor | None] = [keys["v"].flatten(1)]
        k_given = attn.k_norm is None or "k_lin" in keys
        if k_given:
            given.append(attn.k_proj)
            outputs.append(keys["k_lin"] if attn.k_norm is not None else None)
        q_given = "q_lin" in queries and rows.query_rows is None
        if q_given:
            given.append(attn.q_proj)
            outputs.append(queries["q_lin"])
        projected = given_linears(given, xn, outputs)
        v = projected[0].view_as(keys["v"])
        k_lin = projected[1] if k_given else attn.k_proj(xn)
        if attn.k_norm is None:
            k = apply_rope(k_lin.view_as(keys["k"]), rows.cos, rows.sin, known=keys["k"])
        else:  # QK norm: rebuild the norm (and RoPE) from the projection's output, recorded or recomputed
            k = attn.shape_k(k_lin, rows.cos, rows.sin)
        if rows.query_rows is None:
            x_q, xn_q, cos_q, sin_q, cu_q = x, xn, rows.cos, rows.sin, rows.cu_seqlens
        else:
            x_q, xn_q = x.index_select(0, rows.query_rows), xn.index_select(0, rows.query_rows)
            cos_q, sin_q = rows.cos[rows.query_rows], rows.sin[rows.query_rows]
            assert rows.cu_seqlens_q is not None
            cu_q = rows.cu_seqlens_q
        if q_given:
            q_lin = projected[-1]
        elif "q_lin" in queries:
            q_lin = given_linear(attn.q_proj, xn_q, queries["q_lin"])
        else:
            q_lin = attn.q_proj(xn_q)
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
        if "gate" in queries and "up" in queries:
            gate, up = given_linears([mlp.gate_proj, mlp.up_proj], hn, [queries["gate"], queries["up"]])
        else:
            gate, up = mlp.gate_proj(hn), mlp.up_proj(hn)
        down = given_linear(mlp.down_proj, F.silu(gate) * up, None)  # value unused
        live = [r for r in (h, down) if r.requires_grad]
        if live:  # nothing requires grad in a frozen layer whose input gradient is not wanted
            torch.autograd.backward(live, [grad_output] * len(live))
    return x.grad if need_grad_input else None
