"""The hand-derived backwards of RMSNorm and RoPE against HF's layers under autograd (and float64)."""

import pytest
import torch
from alchemist_worker.model.layers import RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

SHAPES = [(37, 96), (19, 4, 32)]  # hidden states; per-head (QK norm)


def _pair(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[RMSNorm, LlamaRMSNorm]:
    ours, ref = RMSNorm(shape[-1], 1e-6), LlamaRMSNorm(shape[-1], eps=1e-6)
    weight = torch.randn(shape[-1], generator=torch.Generator().manual_seed(1))
    for norm in (ours, ref):
        norm.weight.data.copy_(weight)
        norm.to(dtype)
    return ours, ref


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rms_norm_gradients_match_transformers(
    shape: tuple[int, ...], dtype: torch.dtype, rtol: float
) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 3 + 0.5).to(dtype)
    grad = torch.randn(shape, generator=gen).to(dtype)
    ours, ref = _pair(shape, dtype)
    results = []
    for norm in (ours, ref):
        leaf = x.clone().requires_grad_()
        out = norm(leaf)
        out.backward(grad)
        assert norm.weight.grad is not None and leaf.grad is not None
        results.append((out.detach(), leaf.grad, norm.weight.grad))
    for mine, theirs in zip(*results, strict=True):
        scale = theirs.float().abs().max()
        assert (mine.float() - theirs.float()).abs().max() <= rtol * scale


def test_rms_norm_gradient_is_as_close_to_float64_as_transformers() -> None:
    """Both compute in float32; against the same math in float64 ours errs no more than HF's autograd does."""
    gen = torch.Generator().manual_seed(0)
    x, grad = (torch.randn(64, 256, generator=gen) for _ in range(2))
    weight = torch.randn(256, generator=gen)
    exact_leaf = x.double().requires_grad_()
    exact = exact_leaf * torch.rsqrt(exact_leaf.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    exact.backward(grad.double())
    assert exact_leaf.grad is not None
    errors = []
    for norm in _pair((256,), torch.float32):
        norm.weight.data.copy_(weight)
        leaf = x.clone().requires_grad_()
        norm(leaf).backward(grad)
        assert leaf.grad is not None
        errors.append((leaf.grad.double() - exact_leaf.grad).abs().max())
    ours, theirs = errors
    assert ours <= 2 * theirs + 1e-7


def test_rms_norm_frozen_weight_gets_no_gradient_and_no_grad_skips_autograd() -> None:
    norm = RMSNorm(16, 1e-6)
    norm.weight.requires_grad_(False)
    x = torch.randn(5, 16, requires_grad=True)
    norm(x).sum().backward()
    assert norm.weight.grad is None and x.grad is not None
    with torch.no_grad():
        assert norm(x).grad_fn is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_gradient_matches_transformers(dtype: torch.dtype) -> None:
    """apply_rope's inverse-rotation backward against HF's apply_rotary_pos_emb under autograd."""
    gen = torch.Generator().manual_seed(0)
    tokens, heads, head_dim = 23, 4, 32
    cos, sin = rope_cos_sin(torch.arange(tokens), rope_inv_freq(head_dim, 10000.0, None), dtype)
    x = torch.randn(tokens, heads, head_dim, generator=gen).to(dtype)
    grad = torch.randn(tokens, heads, head_dim, generator=gen).to(dtype)
    ours_leaf, ref_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = apply_rope(ours_leaf, cos, sin)
    full_cos, full_sin = (torch.cat([t, t], dim=-1).transpose(0, 1) for t in (cos, sin))  # [1, T, head_dim]
    heads_first = ref_leaf.transpose(0, 1).unsqueeze(0)  # [1, heads, T, head_dim], HF's layout
    ref, _ = apply_rotary_pos_emb(heads_first, heads_first, full_cos, full_sin)
    ref = ref[0].transpose(0, 1)
    ours.backward(grad)
    ref.backward(grad)
    assert ours_leaf.grad is not None and ref_leaf.grad is not None
    rtol = 1e-6 if dtype == torch.float32 else 2e-2
    assert (ours - ref).abs().max() <= rtol * ref.abs().max()
    assert (ours_leaf.grad - ref_leaf.grad).float().abs().max() <= rtol * ref_leaf.grad.float().abs().max()


def test_rope_with_a_known_value_returns_it_and_differentiates_the_rotation() -> None:
    gen = torch.Generator().manual_seed(0)
    cos, sin = rope_cos_sin(torch.arange(7), rope_inv_freq(16, 10000.0, None), torch.float32)
    x = torch.randn(7, 2, 16, generator=gen, requires_grad=True)
    known = apply_rope(x.detach(), cos, sin)
    out = apply_rope(x, cos, sin, known=known)
    assert out.data_ptr() == known.data_ptr()
    grad = torch.randn(7, 2, 16, generator=gen)
    out.backward(grad)
    plain = x.detach().requires_grad_()
    apply_rope(plain, cos, sin).backward(grad)
    assert x.grad is not None and torch.equal(x.grad, plain.grad)
