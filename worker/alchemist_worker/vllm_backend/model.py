"""Our Llama-family decoder as a vLLM model class: vLLM's kernels, our recording hook and served adapters.

vLLM loads it in place of its own class (registered under `ARCHITECTURE`, chosen with `hf_overrides`, so the
stock classes stay untouched). It is stock vLLM's Llama wiring (`LlamaForCausalLM` with our decoder layer) plus
two things:

- recording: when the engine records (`RECORD_KEY`), every layer calls the `alchemist::record` op at three
  points (record_op.py), in compiled code as in eager; on a step that records a prefill, the op's body hands the
  tensors to the step's recording, which copies what it keeps into the same record fields the native engine's
  recorder keeps, so records from either engine are interchangeable. Other steps pay the op's early return;
  an engine that never records has no op in its graph at all;
- served adapters: each LoRA-targeted projection gets fixed-address buffers (A stacked over the fused slices,
  B block-diagonal and pre-scaled) that a version switch overwrites in place, so compiled graphs and CUDA graphs
  keep reading the same memory and see the new values. With no adapter (version 0, or full fine-tuning) they do
  not exist and the forward is stock.

Linear weights stay plain `[out, in]` tensors (on CPU the prepacking that would empty them is turned off) so
that the trainer computes on views of these very tensors (weight_views.py): one copy of the base model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from alchemist_worker.model.config import ModelConfig
from alchemist_worker.vllm_backend.record_op import ATTENTION, CONTEXT_KEY, MLP, PROJECTIONS, record

ARCHITECTURE = "AlchemistForCausalLM"
ADAPTER_CONFIG_KEY = "alchemist_adapter"  # hf_overrides key: {"rank": r, "target_modules": [...]}
SHARE_WEIGHTS_KEY = "alchemist_share_weights"  # hf_overrides key: plain weights the trainer can view
RECORD_KEY = "alchemist_record"  # hf_overrides key: the layers call the record op (the engine records)


class ServedAdapter(nn.Module):
    """scaling * (x A^T) B^T for the slices of one (possibly fused) projection, in fixed-address buffers.

    `slices` are the output widths of the fused projection's parts (q, k, v; or gate, up; or one), `targeted`
    which of them carry an adapter. A stacks the targeted slices' A matrices ([n * r, in]); B is block-diagonal
    ([sum(slices), n * r]) with the scaling folded in, so one projection costs two GEMMs whatever its slices.
    """

    a: Tensor
    b: Tensor

    def __init__(self, in_features: int, slices: Sequence[int], targeted: Sequence[bool], rank: int) -> None:
        super().__init__()
        self.slices, self.targeted, self.rank = list(slices), list(targeted), rank
        n = sum(self.targeted)
        self.register_buffer("a", torch.zeros(n * rank, in_features), persistent=False)
        self.register_buffer("b", torch.zeros(sum(self.slices), n * rank), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.a), self.b)

    @torch.no_grad()
    def load(self, adapters: Sequence[tuple[Tensor, Tensor, float] | None]) -> None:
        """In place: per targeted slice, (A [r, in], B [out, r], scaling), or None for a zero adapter."""
        if len(adapters) != sum(self.targeted):
            raise ValueError(f"expected {sum(self.targeted)} adapters, got {len(adapters)}")
        self.a.zero_()
        self.b.zero_()
        row, col = 0, 0
        slot = iter(adapters)
        for width, targeted in zip(self.slices, self.targeted, strict=True):
            if targeted:
                adapter = next(slot)
                if adapter is not None:
                    a, b, scaling = adapter
                    self.a[col : col + self.rank].copy_(a)
                    self.b[row : row + width, col : col + self.rank].copy_(b * scaling)
                col += self.rank
            row += width


def _adapter(in_features: int, parts: dict[str, int], config: dict[str, Any] | None) -> ServedAdapter | None:
    if not config:
        return None
    targeted = [name in config["target_modules"] for name in parts]
    if not any(targeted):
        return None
    return ServedAdapter(in_features, list(parts.values()), targeted, int(config["rank"]))


def _plain_weights(vllm_config: VllmConfig, *layers: nn.Module) -> None:
    """Keeps linear weights as plain tensors on CPU (vLLM would prepack them and empty `weight`) when the
    trainer shares them; serving alone keeps vLLM's packed CPU kernels."""
    if not getattr(vllm_config.model_config.hf_config, SHARE_WEIGHTS_KEY, True):
        return
    for layer in layers:
        layer._cpu_skip_gemm_dispatch = True  # type: ignore[assignment]


class AlchemistAttention(nn.Module):
    def __init__(self, vllm_config: VllmConfig, config: ModelConfig, prefix: str) -> None:
        super().__init__()
        hf = vllm_config.model_config.hf_config
        adapter = getattr(hf, ADAPTER_CONFIG_KEY, None)
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.head_dim,
            config.num_heads,
            config.num_kv_heads,
            bias=config.qkv_bias,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            config.q_size,
            config.hidden_size,
            bias=config.o_bias,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.o_proj",
        )
        _plain_weights(vllm_config, self.qkv_proj, self.o_proj)
        self.qkv_adapter = _adapter(
            config.hidden_size,
            {"q_proj": config.q_size, "k_proj": config.kv_size, "v_proj": config.kv_size},
            adapter,
        )
        self.o_adapter = _adapter(config.q_size, {"o_proj": config.hidden_size}, adapter)
        self.q_norm = RMSNorm(config.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None
        self.rotary_emb = get_rope(
            config.head_dim,
            max_position=config.max_position_embeddings,
            rope_parameters=getattr(hf, "rope_parameters", None),
            is_neox_style=True,
        )
        self.attn = Attention(
            config.num_heads,
            config.head_dim,
            config.head_dim**-0.5,
            num_kv_heads=config.num_kv_heads,
            cache_config=vllm_config.cache_config,
            quant_config=vllm_config.quant_config,
            per_layer_sliding_window=config.sliding_window,
            prefix=f"{prefix}.attn",
        )

    def _norm_heads(self, t: Tensor, norm: RMSNorm | None, heads: int) -> Tensor:
        if norm is None:
            return t
        return norm(t.view(-1, heads, self.head_dim)).view(t.shape)

    def forward(
        self, positions: Tensor, x: Tensor, record_token: Tensor | None, layer: int
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """o_proj's output, and views of k, v ([T, kv_heads, head_dim]) and the attention output ([T, heads,
        head_dim]) for the layer to hand over (the softmax log-sum-exp is not returned by vLLM's attention; the
        trainer computes it, see step_recording.py)."""
        qkv, _ = self.qkv_proj(x)
        if self.qkv_adapter is not None:
            qkv = qkv + self.qkv_adapter(x)
        q_lin, k_lin, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if record_token is not None:  # here: rotary (and QK norm) below write q_lin and k_lin in place
            record(record_token, layer, PROJECTIONS, (q_lin, k_lin))
        q = self._norm_heads(q_lin, self.q_norm, self.num_heads)
        k = self._norm_heads(k_lin, self.k_norm, self.num_kv_heads)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v)  # [T, heads * head_dim]
        o, _ = self.o_proj(out)
        if self.o_adapter is not None:
            o = o + self.o_adapter(out)
        tokens = x.shape[0]
        heads = (
            k.view(tokens, self.num_kv_heads, self.head_dim),
            v.view(tokens, self.num_kv_heads, self.head_dim),
            out.view(tokens, self.num_heads, self.head_dim),
        )
        return o, heads


class AlchemistMLP(nn.Module):
    def __init__(self, vllm_config: VllmConfig, config: ModelConfig, prefix: str) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size,
            [config.intermediate_size] * 2,
            bias=config.mlp_bias,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size,
            config.hidden_size,
            bias=config.mlp_bias,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.down_proj",
        )
        _plain_weights(vllm_config, self.gate_up_proj, self.down_proj)


class AlchemistDecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", **_: Any) -> None:
        super().__init__()
        config = ModelConfig.from_hf(vllm_config.model_config.hf_config.to_dict())
        adapter = getattr(vllm_config.model_config.hf_config, ADAPTER_CONFIG_KEY, None)
        self.layer_idx = extract_layer_index(prefix)
        self.intermediate_size = config.intermediate_size
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = AlchemistAttention(vllm_config, config, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = AlchemistMLP(vllm_config, config, f"{prefix}.mlp")
        self.gate_up_adapter = _adapter(
            config.hidden_size,
            {"gate_proj": config.intermediate_size, "up_proj": config.intermediate_size},
            adapter,
        )
        self.down_adapter = _adapter(config.intermediate_size, {"down_proj": config.hidden_size}, adapter)
        self.act_fn = SiluAndMul()
        records = getattr(vllm_config.model_config.hf_config, RECORD_KEY, False)  # see record_op.py
        self.record_token: Tensor | None
        self.register_buffer("record_token", torch.zeros(1) if records else None, persistent=False)

    def forward(
        self, positions: Tensor, hidden_states: Tensor, residual: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        token, layer = self.record_token, self.layer_idx
        if residual is None:
            residual = hidden_states
            xn = self.input_layernorm(hidden_states)
        else:
            xn, residual = self.input_layernorm(hidden_states, residual)
        o, (k, v, attn) = self.self_attn(positions, xn, token, layer)
        # here residual is still the layer's input; the fused add-norm below overwrites it and o in place
        if token is not None:
            record(token, layer, ATTENTION, (residual, k, v, attn, o))
        hn, residual = self.post_attention_layernorm(o, residual)
        gate_up, _ = self.mlp.gate_up_proj(hn)
        if self.gate_up_adapter is not None:
            gate_up = gate_up + self.gate_up_adapter(hn)
        if token is not None:
            record(token, layer, MLP, gate_up.split(self.intermediate_size, dim=-1))
        h = self.act_fn(gate_up)
        out, _ = self.mlp.down_proj(h)
        if self.down_adapter is not None:
            out = out + self.down_adapter(h)
        return out, residual


class AlchemistForCausalLM(LlamaForCausalLM):
    """vLLM's Llama wiring around `AlchemistDecoderLayer`; records a prefill when `step_recording` is set."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=AlchemistDecoderLayer)
        self.step_recording: Any = None  # set by the runner hook for the one step that records

    def forward(
        self,
        input_ids: Tensor | None,
        positions: Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        step = self.step_recording
        if step is None:
            return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)
        if input_ids is None:
            raise RuntimeError("recording a prefill needs input_ids (not inputs_embeds)")
        step.start(input_ids)
        context = get_forward_context().additional_kwargs  # this forward's; the record op finds the step here
        context[CONTEXT_KEY] = step
        try:  # compiled (or not) as any other step: the record op's body runs inside
            return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)
        finally:
            del context[CONTEXT_KEY]
