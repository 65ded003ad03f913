"""The model's shared layers: RMSNorm, rotary position embeddings (with Llama-3 scaling), and a linear layer
that can carry a LoRA adapter.

Numerics follow the HF reference implementations on purpose (RMSNorm in fp32 then cast back; cos/sin computed
in fp32 then cast to the activation dtype) so logits agree to 1e-4 in fp32 and stay close in bf16/fp16.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alchemist_worker.model.config import Llama3RopeScaling


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x: [..., dim] normalized over its last dimension, computed in fp32."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNormFunction.apply(x, weight, eps)
    return weight * _normalized(x, _inverse_rms(x, eps))


def _inverse_rms(x: Tensor, eps: float) -> Tensor:
    x32 = x.float()
    return torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


def _normalized(x: Tensor, inverse_rms: Tensor) -> Tensor:
    return (x.float() * inverse_rms).to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """`rms_norm` with a hand-derived backward: dx = r (g - x r^2 mean(g x)), with g = dy w and r the inverse
    RMS, in four passes over x where autograd's chain of elementwise nodes takes about eight (elementwise passes
    are what a replayed layer spends beyond its matmuls). The forward is the plain one (HF's numerics)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        inverse_rms = _inverse_rms(x, eps)
        ctx.save_for_backward(x, weight, inverse_rms)
        return weight * _normalized(x, inverse_rms)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, inverse_rms = ctx.saved_tensors
        dx = dweight = None
        if ctx.needs_input_grad[1]:
            dweight = (grad * _normalized(x, inverse_rms)).flatten(0, -2).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            x32 = x.float()
            g = (grad * weight).float()  # a new tensor: the in-place steps below touch nothing saved
            mean_gx = torch.linalg.vecdot(g, x32).unsqueeze(-1) / x.shape[-1]
            dx = g.mul_(inverse_rms).addcmul_(x32, mean_gx * inverse_rms.pow(3), value=-1).to(x.dtype)
        return dx, dweight, None


def rope_inv_freq(head_dim: int, theta: float, scaling: Llama3RopeScaling | None) -> Tensor:
    """[head_dim // 2] inverse frequencies in fp32; Llama-3 scaling divides long wavelengths by `factor`
    and interpolates smoothly between the two cut-offs."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions: [T] -> cos, sin: [T, 1, head_dim // 2] in `dtype` (broadcast over heads).

    HF builds [T, head_dim] tables whose two halves are equal; keeping one half gives the same products
    with half the memory traffic.
    """
    angles = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]  # [T, head_dim/2]
    return angles.cos().to(dtype)[:, None, :], angles.sin().to(dtype)[:, None, :]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, known: Tensor | None = None) -> Tensor:
    """x: [T, heads, head_dim] rotated by each token's angles (half-split pairs, as HF Llama does).

    `known`: the rotation's value where it is already known (the trainer's replay of a recorded layer); it is
    returned as is, and only the backward runs."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _RopeFunction.apply(x, cos, sin, known)
    return _rotate(x, cos, sin) if known is None else known


class _RopeFunction(torch.autograd.Function):
    """`apply_rope` whose backward is the inverse rotation: autograd's would scatter the gradients of the two
    halves into zero-filled tensors and add them, twice the passes over x."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, cos: Tensor, sin: Tensor, known: Tensor | None) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin) if known is None else known.view_as(known)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        return unapply_rope(grad, cos, sin), None, None, None


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def unapply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The inverse rotation: unapply_rope(apply_rope(x)) == x up to rounding. Lets the trainer rebuild a
    projection's output from the rotated K that serving recorded, instead of recomputing the matmul."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class LoRALinear(nn.Module):
    """y = x W^T + b + scaling * (x A^T) B^T, with the adapter (A, B) optional.

    Parameter names match what `peft` calls them (`lora_A`, `lora_B`, rank r, scaling alpha / r) so adapters
    convert to and from PEFT files by a key rename (see training/lora.py). Dropout is not supported: it would
    make the recorded activations and the training forward differ.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.lora_A: nn.Parameter | None = None  # [r, in_features]
        self.lora_B: nn.Parameter | None = None  # [out_features, r]
        self.scaling = 0.0

    def add_adapter(self, rank: int, alpha: float, *, use_rslora: bool = False) -> None:
        """Adds a zero-initialized adapter (B = 0, so outputs are unchanged) as PEFT does by default."""
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        device, dtype = self.weight.device, self.weight.dtype
        a = torch.empty(rank, self.in_features, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)

    def remove_adapter(self) -> None:
        self.lora_A = self.lora_B = None
        self.scaling = 0.0

    @property
    def has_adapter(self) -> bool:
        return self.lora_A is not None

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.lora_A is None or self.lora_B is None:
            return y
        if x.ndim != 2:
            return y + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)
        # y + s (x A^T) B^T in one GEMM call into y, which nothing else holds: no pass over y to copy, scale or
        # add (autograd saves the linear's input, not its output)
        return y.addmm_(F.linear(x, self.lora_A), self.lora_B.t(), alpha=self.scaling)

    def extra_repr(self) -> str:
        rank = 0 if self.lora_A is None else self.lora_A.shape[0]
        return (
            f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, lora_rank={rank}"
        )
