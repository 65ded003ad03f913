"""Fused causal attention with log-sum-exp on CUDA, and its backward from saved statistics.

The recording policies `selective` and `full` need the softmax log-sum-exp of each prompt token, and the trainer's
replay differentiates attention from a record's (q, k, v, out, lse) without running the forward again. PyTorch's
public `scaled_dot_product_attention` returns neither, so on CUDA this module calls the memory-efficient kernel
behind it (`aten::_efficient_attention_forward` / `_backward`, the same kernel SDPA dispatches to): it takes fp32,
fp16 and bf16, aligns the causal mask bottom-right (queries are the last tokens of their keys, as after a cached
prefix), never materializes the score matrix, and returns the log-sum-exp the backward needs.

The kernel wants as many key heads as query heads, so grouped-query keys and values are expanded (and their
gradients summed back); sliding windows are left to the reference implementation in `attention.py`.

Private ATen ops can change between PyTorch releases, so the first use on each (device, dtype) compares the kernel
with the reference on a small input; if they disagree or the op is missing, a warning is logged once and callers
fall back to the reference (correct, but it materializes the scores). The CPU test suite checks the calls against
the installed PyTorch's op schemas (tests/worker/model/test_attention_cuda.py), so an upgrade that changes them
shows before a GPU runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

_FORWARD = getattr(torch.ops.aten, "_efficient_attention_forward", None)
_BACKWARD = getattr(torch.ops.aten, "_efficient_attention_backward", None)
_CAUSAL_BOTTOM_RIGHT = 2  # the kernel's custom_mask_type for causal attention aligned to the last key
_LSE_ALIGN = 32  # the kernel pads the log-sum-exp's query dimension to a multiple of this

Reference = Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]


def _expand_heads(t: Tensor, n_heads: int) -> Tensor:
    groups = n_heads // t.shape[1]
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _fold_heads(grad: Tensor, n_kv_heads: int) -> Tensor:
    """Sum the gradients of expanded heads back onto the key/value head they were copied from."""
    t, n_heads, d = grad.shape
    if n_heads == n_kv_heads:
        return grad
    return grad.view(t, n_kv_heads, n_heads // n_kv_heads, d).sum(dim=2)


def _no_rng() -> tuple[Tensor, Tensor]:
    """Dropout is off, so the kernel's philox seed and offset are unused placeholders."""
    return torch.empty((), dtype=torch.int64), torch.empty((), dtype=torch.int64)


def fused_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """One sequence: q [tq, H, D], k/v [tk, Hkv, D] (tq <= tk, causal, bottom-right aligned) ->
    out [tq, H, D], lse [tq, H] fp32."""
    assert _FORWARD is not None
    n_heads = q.shape[1]
    qb = q.unsqueeze(0).contiguous()
    kb = _expand_heads(k, n_heads).unsqueeze(0).contiguous()
    vb = _expand_heads(v, n_heads).unsqueeze(0).contiguous()
    out, lse, *_ = _FORWARD(
        qb,
        kb,
        vb,
        None,
        None,
        None,
        None,
        None,
        0.0,
        _CAUSAL_BOTTOM_RIGHT,
        True,
        scale=scale,
    )
    return out[0], lse[0, :, : q.shape[0]].transpose(0, 1).float()


def fused_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of `fused_attention` for one sequence from its saved inputs, output and lse."""
    assert _BACKWARD is not None
    tq, n_heads, n_kv_heads = q.shape[0], q.shape[1], k.shape[1]
    padded = -(-tq // _LSE_ALIGN) * _LSE_ALIGN
    lse_b = F.pad(lse.float().transpose(0, 1), (0, padded - tq)).unsqueeze(0).contiguous()
    seed, offset = _no_rng()
    dq, dk, dv, _ = _BACKWARD(
        grad_out.unsqueeze(0).contiguous(),
        q.unsqueeze(0).contiguous(),
        _expand_heads(k, n_heads).unsqueeze(0).contiguous(),
        _expand_heads(v, n_heads).unsqueeze(0).contiguous(),
        None,
        out.unsqueeze(0).contiguous(),
        None,
        None,
        tq,
        k.shape[0],
        lse_b,
        0.0,
        seed,
        offset,
        _CAUSAL_BOTTOM_RIGHT,
        False,
        scale=scale,
    )
    return dq[0], _fold_heads(dk[0], n_kv_heads), _fold_heads(dv[0], n_kv_heads)


def fused_attention_usable(
    device: torch.device, dtype: torch.dtype, head_dim: int, reference: Reference
) -> bool:
    """Whether the fused kernel runs and agrees with `reference` on this device, dtype and head size."""
    if device.type != "cuda" or _FORWARD is None or _BACKWARD is None:
        return False
    return _self_check(device, dtype, head_dim, reference)


@cache
def _self_check(device: torch.device, dtype: torch.dtype, head_dim: int, reference: Reference) -> bool:
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(n, h, head_dim, device=device, dtype=dtype, generator=gen)
        for n, h in ((5, 4), (9, 2), (9, 2))
    )
    scale = head_dim**-0.5
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    try:
        out, lse = fused_attention(q, k, v, scale)
        with torch.enable_grad():
            rq, rk, rv = (t.detach().float().requires_grad_() for t in (q, k, v))
            ref_out, ref_lse = reference(rq, rk, rv, scale)
            grad = torch.randn(ref_out.shape, device=device, generator=gen)
            ref_grads = torch.autograd.grad(ref_out, (rq, rk, rv), grad)
        grads = fused_attention_backward(grad.to(dtype), q, k, v, out, lse, scale)
        agree = torch.allclose(out.float(), ref_out, atol=tol, rtol=tol) and torch.allclose(
            lse, ref_lse, atol=tol, rtol=tol
        )
        agree = agree and all(
            torch.allclose(g.float(), r, atol=tol * 10, rtol=tol * 10)
            for g, r in zip(grads, ref_grads, strict=True)
        )
    except RuntimeError as exc:
        log.warning(
            "fused attention kernel unavailable on %s/%s (%s); using the reference", device, dtype, exc
        )
        return False
    if not agree:
        log.warning(
            "fused attention kernel disagrees with the reference on %s/%s; using the reference", device, dtype
        )
    return agree
