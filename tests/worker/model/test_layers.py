"""RMSNorm's hand-derived backward against HF's LlamaRMSNorm under autograd, and against float64."""

import pytest
import torch
from alchemist_worker.model.layers import RMSNorm, rms_norm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

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
def test_rms_norm_gradients_match_transformers(shape: tuple[int, ...], dtype: torch.dtype, rtol: float) -> None:
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
