"""The CUDA attention kernel with log-sum-exp and its backward, against the plain softmax of test_attention."""

from typing import Any

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


def _binds(schema: torch.FunctionSchema, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """Why `args` and `kwargs` do not fit `schema`, argument by argument (empty: they fit)."""
    positional = [a for a in schema.arguments if not a.kwarg_only]
    named = {a.name: a for a in schema.arguments if a.kwarg_only}
    problems = [] if len(args) == len(positional) else [f"{len(args)} positional for {len(positional)}"]
    pairs = list(zip(positional, args, strict=False))
    for name, value in kwargs.items():
        if name not in named:
            problems.append(f"no keyword {name}")
        else:
            pairs.append((named[name], value))
    kinds = {"Tensor": torch.Tensor, "int": int, "SymInt": int, "float": float, "bool": bool}
    for arg, value in pairs:
        text = str(arg.type)
        optional = text.startswith("Optional[")
        kind = kinds.get(text.removeprefix("Optional[").removesuffix("]"))
        if kind is None:
            problems.append(f"{arg.name}: a {text}, which this check does not know")
            continue
        wrong_kind = not isinstance(value, kind) or (kind is int and isinstance(value, bool))
        if (value is None and not optional) or (value is not None and wrong_kind):
            problems.append(f"{arg.name}: {type(value).__name__} for {text}")
    return problems


def test_kernel_calls_fit_this_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The private ops' signatures change between PyTorch releases, and the GPU tests find a mismatch only on a
    GPU. Here, on the CPU: the forward runs on meta tensors (PyTorch's shape functions), and the backward's
    arguments bind, by position and type, to the installed op's schema (its meta function disagrees with
    its own schema, so it cannot run), with the log-sum-exp padded as the forward pads it."""
    if cuda_attention._FORWARD is None or cuda_attention._BACKWARD is None:
        pytest.skip("this PyTorch has no memory-efficient attention ops")
    q = torch.empty(5, 16, 64, device="meta")
    k, v = torch.empty(9, 4, 64, device="meta"), torch.empty(9, 4, 64, device="meta")
    out, lse = cuda_attention.fused_attention(q, k, v, 0.125)
    assert out.shape == (5, 16, 64) and lse.shape == (5, 16) and lse.dtype == torch.float32
    raw_lse = cuda_attention._FORWARD(
        *(q.unsqueeze(0),) * 3, None, None, None, None, None, 0.0, cuda_attention._CAUSAL_BOTTOM_RIGHT, True
    )[1]
    assert raw_lse.shape[-1] % cuda_attention._LSE_ALIGN == 0

    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def capture(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        calls.append((args, kwargs))
        return args[1], args[2], args[3], args[1]

    monkeypatch.setattr(cuda_attention, "_BACKWARD", capture)
    dq, dk, dv = cuda_attention.fused_attention_backward(torch.empty_like(out), q, k, v, out, lse, 0.125)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    ((args, kwargs),) = calls
    schema = torch.ops.aten._efficient_attention_backward.default._schema
    assert _binds(schema, args, kwargs) == []
    names = [a.name for a in schema.arguments]
    given = dict(zip(names, args, strict=False)) | kwargs
    assert given["out"] is not None and given["out"].shape == (1, 5, 16, 64)
    assert given["logsumexp"].shape == raw_lse.shape
    assert (given["max_seqlen_q"], given["max_seqlen_k"]) == (5, 9)


def test_schema_binding_sees_a_shifted_argument() -> None:
    """The binding check above fails for the mistake it is there to catch: one argument left out."""
    if cuda_attention._BACKWARD is None:
        pytest.skip("this PyTorch has no memory-efficient attention ops")
    schema = torch.ops.aten._efficient_attention_backward.default._schema
    t = torch.empty(0)
    right = (t, t, t, t, None, t, None, None, 5, 9, t, 0.0, t, t, 2, False)
    assert _binds(schema, right, {"scale": 0.1}) == []
    assert _binds(schema, right[:5] + right[6:], {"scale": 0.1})  # `out` missing
    assert _binds(schema, right, {"softmax_scale": 0.1})


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
