"""Attention: the contract between the model and whoever owns the KV cache, and the varlen causal kernels.

The model never owns KV caches or per-step metadata. Each attention layer computes q, k, v for the tokens of
the current forward (bias, QK norm and RoPE applied) and hands them to an `AttentionBackend`:

    out, lse = backend.attend(layer, q, k, v, need_lse=...)
    # q: [T, n_heads, head_dim]; k, v: [T, n_kv_heads, head_dim] (the new tokens only)
    # out: [T, n_heads, head_dim]; lse: [T, n_heads] fp32 softmax log-sum-exp, or None unless need_lse

The backend writes k/v wherever it keeps them (a paged cache in the engine, nothing for a plain prefill),
attends each new token to its sequence's keys causally, and returns the output. `need_lse` is True only when
a recorder asks for softmax statistics (recording policies `selective` and `full`), so decode never pays for it.
T is a flat batch of tokens from several sequences, without padding; how the backend knows where sequences
start is its own per-step metadata (e.g. `cu_seqlens`), never global state.

`varlen_attention` is the pure function every backend can build on: causal attention over sequences given by
cumulative lengths, where each sequence's queries are the *last* tokens of its keys (bottom-right aligned,
as after a cached prefix), returning the output and the log-sum-exp. `varlen_attention_backward` is its
gradient from saved (q, k, v, out, lse), which lets the trainer skip the attention forward when a record holds
the output and the statistics. On CPU both use PyTorch's fused flash kernel (which takes GQA directly); on
CUDA, PyTorch's memory-efficient kernel (`cuda_attention`) whenever the log-sum-exp is needed and SDPA otherwise.
`_softmax_attention`, which materializes the scores, is the reference the kernels are tested against and the
fallback for sliding windows off CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from alchemist_worker.model.cuda_attention import (
    fused_attention,
    fused_attention_backward,
    fused_attention_usable,
)

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)

CuSeqlens = Sequence[int] | Tensor


class AttentionBackend(Protocol):
    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, *, need_lse: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """q: [T, n_heads, head_dim], k/v: [T, n_kv_heads, head_dim] -> (out [T, n_heads, head_dim],
        lse [T, n_heads] fp32 when need_lse else None)."""
        ...


def as_offsets(cu_seqlens: CuSeqlens) -> list[int]:
    """Cumulative sequence lengths as Python ints ([0, len0, len0+len1, ...]), validated."""
    offsets = [int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else cu_seqlens)]
    if not offsets or offsets[0] != 0 or any(b < a for a, b in pairwise(offsets)):
        raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {offsets}")
    return offsets


def allowed_keys(q_len: int, k_len: int, sliding_window: int | None, device: torch.device) -> Tensor:
    """[q_len, k_len] bool: which keys each query sees under bottom-right aligned causal attention.

    Query i sits at key position k_len - q_len + i; it sees keys at or before it, and with a window only the
    last `sliding_window` of those.
    """
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    return allowed


def causal_mask(
    q_len: int, k_len: int, sliding_window: int | None, dtype: torch.dtype, device: torch.device
) -> Tensor | None:
    """Additive [q_len, k_len] mask of `allowed_keys`, or None where the kernels' plain causal flag does."""
    if q_len == k_len and (sliding_window is None or sliding_window >= k_len):
        return None
    allowed = allowed_keys(q_len, k_len, sliding_window, device)
    return torch.zeros(q_len, k_len, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))


def _one_sequence(
    q: Tensor, k: Tensor, v: Tensor, scale: float, sliding_window: int | None, need_lse: bool
) -> tuple[Tensor, Tensor | None]:
    """q: [tq, H, D], k/v: [tk, Hkv, D] -> out [tq, H, D], lse [tq, H] | None."""
    if need_lse and _fused_applies(q, k, v, sliding_window):
        return fused_attention(q, k, v, scale)
    mask = causal_mask(q.shape[0], k.shape[0], sliding_window, q.dtype, q.device)
    qb, kb, vb = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, len, D]
    if _FLASH_CPU is not None and q.device.type == "cpu":
        out, lse = _FLASH_CPU(qb, kb, vb, 0.0, mask is None, attn_mask=mask, scale=scale)
        return out[0].transpose(0, 1), lse[0].transpose(0, 1)
    if not need_lse:
        out = F.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
        )
        return out[0].transpose(0, 1), None
    return _softmax_attention(q, k, v, scale, sliding_window)


def _fused_applies(q: Tensor, k: Tensor, v: Tensor, sliding_window: int | None) -> bool:
    """The CUDA kernel with log-sum-exp serves windowless attention outside autograd (see cuda_attention)."""
    if q.device.type != "cuda" or sliding_window is not None:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return False
    return fused_attention_usable(q.device, q.dtype, q.shape[-1], _reference_attention)


def _reference_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return _softmax_attention(q, k, v, scale, None)


def _softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, sliding_window: int | None
) -> tuple[Tensor, Tensor]:
    """Reference attention that materializes the scores; used off CPU when the LSE is needed."""
    groups = q.shape[1] // k.shape[1]
    kh = k.repeat_interleave(groups, dim=1).transpose(0, 1).float()  # [H, tk, D]
    vh = v.repeat_interleave(groups, dim=1).transpose(0, 1).float()
    scores = torch.matmul(q.transpose(0, 1).float(), kh.transpose(1, 2)) * scale  # [H, tq, tk]
    allowed = allowed_keys(q.shape[0], k.shape[0], sliding_window, q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [H, tq]
    out = torch.matmul(torch.exp(scores - lse[..., None]), vh)  # [H, tq, D]
    return out.transpose(0, 1).to(q.dtype), lse.transpose(0, 1)


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: CuSeqlens,
    cu_seqlens_k: CuSeqlens,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    need_lse: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Causal attention over a flat batch of sequences; differentiable through autograd.

    q: [Tq, H, D]; k, v: [Tk, Hkv, D]; sequence i owns q rows cu_seqlens_q[i]:cu_seqlens_q[i+1] and k rows
    cu_seqlens_k[i]:cu_seqlens_k[i+1], with at least as many keys as queries (the queries are its last tokens).
    Returns out [Tq, H, D] and, when need_lse (always on CPU, where it is free), lse [Tq, H] in fp32.
    """
    offsets_q, offsets_k = as_offsets(cu_seqlens_q), as_offsets(cu_seqlens_k)
    if len(offsets_q) != len(offsets_k):
        raise ValueError(f"cu_seqlens_q has {len(offsets_q)} entries but cu_seqlens_k has {len(offsets_k)}")
    if offsets_q[-1] != q.shape[0] or offsets_k[-1] != k.shape[0]:
        raise ValueError(
            f"cu_seqlens end at {offsets_q[-1]} / {offsets_k[-1]} but q has {q.shape[0]} and k {k.shape[0]} rows"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs: list[Tensor] = []
    lses: list[Tensor] = []
    for i in range(len(offsets_q) - 1):
        q0, q1, k0, k1 = offsets_q[i], offsets_q[i + 1], offsets_k[i], offsets_k[i + 1]
        if q1 - q0 > k1 - k0:
            raise ValueError(f"sequence {i} has {q1 - q0} queries but only {k1 - k0} keys")
        if q1 == q0:
            continue
        out, lse = _one_sequence(q[q0:q1], k[k0:k1], v[k0:k1], scale, sliding_window, need_lse)
        outs.append(out)
        if lse is not None:
            lses.append(lse)
    if not outs:
        empty_lse = q.new_empty(0, q.shape[1], dtype=torch.float32) if need_lse else None
        return q.new_empty(q.shape), empty_lse
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    if not need_lse:
        return out, None
    return out, (lses[0] if len(lses) == 1 else torch.cat(lses))


def varlen_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: CuSeqlens,
    cu_seqlens_k: CuSeqlens,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of `varlen_attention` from its saved inputs, output and log-sum-exp, without
    running the forward again (on CPU and CUDA; the reference recomputes it); shapes as in `varlen_attention`."""
    offsets_q, offsets_k = as_offsets(cu_seqlens_q), as_offsets(cu_seqlens_k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dqs: list[Tensor] = []
    dks: list[Tensor] = []
    dvs: list[Tensor] = []
    for i in range(len(offsets_q) - 1):
        q0, q1, k0, k1 = offsets_q[i], offsets_q[i + 1], offsets_k[i], offsets_k[i + 1]
        if q1 == q0:  # keys nobody queried get no gradient
            dks.append(torch.zeros_like(k[k0:k1]))
            dvs.append(torch.zeros_like(v[k0:k1]))
            continue
        if _FLASH_CPU_BACKWARD is not None and q.device.type == "cpu":
            mask = causal_mask(q1 - q0, k1 - k0, sliding_window, q.dtype, q.device)
            bq, bk, bv, bo, bg = (
                t.transpose(0, 1).unsqueeze(0)
                for t in (q[q0:q1], k[k0:k1], v[k0:k1], out[q0:q1], grad_out[q0:q1])
            )
            blse = lse[q0:q1].transpose(0, 1).unsqueeze(0).contiguous()
            gq, gk, gv = _FLASH_CPU_BACKWARD(
                bg, bq, bk, bv, bo, blse, 0.0, mask is None, attn_mask=mask, scale=scale
            )
            dqs.append(gq[0].transpose(0, 1))
            dks.append(gk[0].transpose(0, 1))
            dvs.append(gv[0].transpose(0, 1))
            continue
        sq, sk, sv = q[q0:q1].detach(), k[k0:k1].detach(), v[k0:k1].detach()
        if _fused_applies(sq, sk, sv, sliding_window):
            gq, gk, gv = fused_attention_backward(grad_out[q0:q1], sq, sk, sv, out[q0:q1], lse[q0:q1], scale)
            dqs.append(gq)
            dks.append(gk)
            dvs.append(gv)
            continue
        with torch.enable_grad():
            tq, tk, tv = (t.detach().requires_grad_() for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
            o, _ = _softmax_attention(tq, tk, tv, scale, sliding_window)
            gq, gk, gv = torch.autograd.grad(o, (tq, tk, tv), grad_out[q0:q1])
        dqs.append(gq)
        dks.append(gk)
        dvs.append(gv)
    if not dqs:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    return tuple(parts[0] if len(parts) == 1 else torch.cat(parts) for parts in (dqs, dks, dvs))  # type: ignore[return-value]


class DenseCausalAttention:
    """The backend of a plain prefill with no cache: the batch's own tokens are all the keys there are.

    Used by tests, by the trainer's recompute path, and by any prefill that records without an engine.
    """

    def __init__(
        self, cu_seqlens: CuSeqlens, *, sliding_window: int | None = None, scale: float | None = None
    ) -> None:
        self.offsets = as_offsets(cu_seqlens)
        self.sliding_window = sliding_window
        self.scale = scale

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, *, need_lse: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        return varlen_attention(
            q,
            k,
            v,
            self.offsets,
            self.offsets,
            scale=self.scale,
            sliding_window=self.sliding_window,
            need_lse=need_lse,
        )
