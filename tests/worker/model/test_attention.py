"""The varlen causal attention kernels against a plain softmax written out here."""

import pytest
import torch
from alchemist_worker.model.attention import (
    DenseCausalAttention,
    as_offsets,
    varlen_attention,
    varlen_attention_backward,
)


def reference(q, k, v, q_lens, k_lens, window=None):
    """Per sequence, bottom-right causal softmax attention with GQA by repeating K/V heads."""
    outs, lses, q0, k0 = [], [], 0, 0
    groups = q.shape[1] // k.shape[1]
    for tq, tk in zip(q_lens, k_lens, strict=True):
        qs, ks, vs = q[q0 : q0 + tq], k[k0 : k0 + tk], v[k0 : k0 + tk]
        ks, vs = ks.repeat_interleave(groups, 1), vs.repeat_interleave(groups, 1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) / q.shape[-1] ** 0.5
        qpos = torch.arange(tk - tq, tk)[:, None]
        kpos = torch.arange(tk)[None, :]
        allowed = kpos <= qpos
        if window is not None:
            allowed &= kpos > qpos - window
        scores = scores.masked_fill(~allowed, float("-inf"))
        lses.append(scores.logsumexp(-1).T)
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs))
        q0, k0 = q0 + tq, k0 + tk
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("window", [None, 4])
def test_varlen_matches_reference_with_prefixes_and_gqa(window) -> None:
    torch.manual_seed(0)
    q_lens, k_lens = [3, 7, 1, 5], [10, 7, 4, 5]
    q = torch.randn(sum(q_lens), 8, 32, dtype=torch.float64).float()
    k, v = torch.randn(sum(k_lens), 2, 32), torch.randn(sum(k_lens), 2, 32)
    cu_q, cu_k = [0, 3, 10, 11, 16], [0, 10, 17, 21, 26]
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, sliding_window=window, need_lse=True)
    ref_out, ref_lse = reference(q, k, v, q_lens, k_lens, window)
    assert lse is not None
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)

    grad = torch.randn_like(out)
    dq, dk, dv = varlen_attention_backward(grad, q, k, v, out, lse, cu_q, cu_k, sliding_window=window)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    reference(*leaves, q_lens, k_lens, window)[0].backward(grad)
    for ours, ref in zip((dq, dk, dv), leaves, strict=True):
        torch.testing.assert_close(ours, ref.grad, atol=1e-5, rtol=1e-5)


def test_dense_backend_is_plain_prefill() -> None:
    torch.manual_seed(1)
    q, k, v = torch.randn(9, 4, 32), torch.randn(9, 4, 32), torch.randn(9, 4, 32)
    out, lse = DenseCausalAttention(torch.tensor([0, 4, 9])).attend(0, q, k, v)
    assert lse is None or lse.shape == (9, 4)
    torch.testing.assert_close(out, reference(q, k, v, [4, 5], [4, 5])[0], atol=1e-5, rtol=1e-5)


def test_bad_offsets_are_rejected() -> None:
    q = torch.randn(4, 2, 32)
    with pytest.raises(ValueError, match="start at 0"):
        as_offsets([1, 4])
    with pytest.raises(ValueError, match="q has 4"):
        varlen_attention(q, q, q, [0, 3], [0, 3])
    with pytest.raises(ValueError, match="2 queries but only 1 keys"):
        varlen_attention(q, q[:3], q[:3], [0, 2, 4], [0, 1, 3])
