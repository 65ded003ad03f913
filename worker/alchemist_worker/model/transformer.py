"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3): wiring only.

    hidden = model(input_ids, positions, attention, recorder=None)   # [T] tokens -> [T, hidden] (final norm)
    logits = model.compute_logits(hidden[last_token_rows])           # only where logits are needed

`input_ids` and `positions` are flat over the tokens of several sequences (no padding). The model owns no KV
cache and no per-step metadata: `attention` (see model/attention.py) does, and `recorder` (see
model/layer_activations.py) sees each layer's activations during a recorded prefill. Module names follow the
HF checkpoints (`layers.3.self_attn.q_proj`, `layers.3.mlp.down_proj`, ...), so LoRA targets and PEFT keys use
the names people already know.
"""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alchemist_worker.model.attention import AttentionBackend
from alchemist_worker.model.config import ModelConfig
from alchemist_worker.model.layer_activations import LayerActivations, Recorder
from alchemist_worker.model.layers import LoRALinear, RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq

HANDED_OVER = frozenset(f.name for f in fields(LayerActivations) if f.name != "handed_over")


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        self.q_proj = LoRALinear(config.hidden_size, config.q_size, config.qkv_bias)
        self.k_proj = LoRALinear(config.hidden_size, config.kv_size, config.qkv_bias)
        self.v_proj = LoRALinear(config.hidden_size, config.kv_size, config.qkv_bias)
        self.o_proj = LoRALinear(config.q_size, config.hidden_size, config.o_bias)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def shape_q(self, q_lin: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """[T, n_heads * head_dim] -> [T, n_heads, head_dim] with QK norm (if any) and RoPE applied."""
        q = q_lin.view(q_lin.shape[0], self.num_heads, self.head_dim)
        return apply_rope(self.q_norm(q) if self.q_norm is not None else q, cos, sin)

    def shape_k(self, k_lin: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        k = k_lin.view(k_lin.shape[0], self.num_kv_heads, self.head_dim)
        return apply_rope(self.k_norm(k) if self.k_norm is not None else k, cos, sin)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = LoRALinear(config.hidden_size, config.intermediate_size, config.mlp_bias)
        self.up_proj = LoRALinear(config.hidden_size, config.intermediate_size, config.mlp_bias)
        self.down_proj = LoRALinear(config.intermediate_size, config.hidden_size, config.mlp_bias)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attention: AttentionBackend,
        recorder: Recorder | None = None,
    ) -> Tensor:
        attn, mlp = self.self_attn, self.mlp
        xn = self.input_layernorm(x)  # [T, hidden]
        q_lin, k_lin, v_lin = attn.q_proj(xn), attn.k_proj(xn), attn.v_proj(xn)
        q, k = attn.shape_q(q_lin, cos, sin), attn.shape_k(k_lin, cos, sin)  # [T, heads, head_dim]
        v = v_lin.view(x.shape[0], attn.num_kv_heads, attn.head_dim)
        need_lse = recorder is not None and recorder.wants_lse
        out, lse = attention.attend(self.layer_idx, q, k, v, need_lse=need_lse)  # [T, n_heads, head_dim]
        flat = out.reshape(x.shape[0], -1)  # [T, n_heads * head_dim], contiguous
        o = attn.o_proj(flat)
        h = x + o
        hn = self.post_attention_layernorm(h)
        gate, up = mlp.gate_proj(hn), mlp.up_proj(hn)  # [T, intermediate]
        y = h + mlp.down_proj(F.silu(gate) * up)
        if recorder is not None:
            acts = LayerActivations(
                x=x,
                q_lin=q_lin,
                k_lin=k_lin,
                k=k,
                v=v,
                attn=flat.view(out.shape),
                lse=lse,
                o=o,
                gate=gate,
                up=up,
                handed_over=HANDED_OVER,  # every tensor here is fresh and never written again
            )
            recorder.record_layer(self.layer_idx, acts)
        return y


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Kept in fp32 and off the module's buffers so casting the model to bf16 leaves the frequencies exact.
        self.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin: [T, 1, head_dim] for the tokens at `positions`."""
        return rope_cos_sin(positions, self.inv_freq, dtype)

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        attention: AttentionBackend,
        recorder: Recorder | None = None,
    ) -> Tensor:
        """input_ids, positions: [T] -> final-normed hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, attention, recorder)
        return self.norm(x)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """[N, hidden] final-normed hidden states -> [N, vocab] logits."""
        return self.lm_head(hidden)
