"""The CUDA attention kernel with log-sum-exp and its backward, against the plain softmax of test_attention."""

import pytest
import torch
from alchemist_worker.model import cuda_attention
from alchemist_worker.model.attention import _reference_attention, varlen_attention, varlen_attention_backward

from tests.worker.model.test_attention import reference


def test_grouped_heads_expand_and_fold_back() -> None:
    """The kernel needs one key head per query head; gradients of the copies sum back onto the original."""
    k = torch.randn(6, 2, 8, requires_grad=True)
    expanded = cuda_attention._expand_heads(k, 8)
    grad = torch.randn(6, 8, 8)
    (expected,) = torch.autograd.grad(expanded, k, grad)
    torch.testing.assert_close(cuda_attention._fold_heads(grad, 2), expected)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)]
)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_fused_kernel_matches_reference(dtype: torch.dtype, tol: float, head_dim: int) -> None:
    device = torch.device("cuda")
    assert cuda_attention.fused_attention_usable(device, dtype, head_dim, _reference_attention), "fell back"
    torch.manual_seed(0)
    q_lens, k_lens = (
        [3, 70, 1, 129],
        [100, 70, 4, 129],
    )  # cached prefixes, a plain prefill, one decode-like row
    cu_q = [0, *torch.tensor(q_lens).cumsum(0).tolist()]
    cu_k = [0, *torch.tensor(k_lens).cumsum(0).tolist()]
    q = torch.randn(sum(q_lens), 8, head_dim, device=device)
    k, v = (
        torch.randn(sum(k_lens), 2, head_dim, device=device),
        torch.randn(sum(k_lens), 2, head_dim, device=device),
    )
    out, lse = varlen_attention(q.to(dtype), k.to(dtype), v.to(dtype), cu_q, cu_k, need_lse=True)
    ref_out, ref_lse = reference(q, k, v, q_lens, k_lens)
    assert lse is not None and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=tol)

    grad = torch.randn_like(ref_out)
    grads = varlen_attention_backward(
        grad.to(dtype), q.to(dtype), k.to(dtype), v.to(dtype), out, lse, cu_q, cu_k
    )
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    reference(*leaves, q_lens, k_lens)[0].backward(grad)
    for ours, ref in zip(grads, leaves, strict=True):
        torch.testing.assert_close(ours.float(), ref.grad, atol=tol * 10, rtol=tol * 10)


@pytest.mark.gpu
def test_long_prompt_does_not_materialize_scores() -> None:
    """A 16k-token prompt with log-sum-exp fits in far less memory than its fp32 score matrix (16 GiB for 16 heads)."""
    device = torch.device("cuda")
    n, heads, head_dim = 16384, 16, 64
    q = torch.randn(n, heads, head_dim, device=device, dtype=torch.bfloat16)
    k = torch.randn(n, 4, head_dim, device=device, dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out, lse = varlen_attention(q, k, k, [0, n], [0, n], need_lse=True)
    peak = torch.cuda.max_memory_allocated() - before
    assert lse is not None and out.shape == q.shape
    assert peak < 1 << 30, f"peak {peak / 2**20:.0f} MiB"
