"""The trainer's model over vLLM's tensors: a native `Transformer` whose base weights are views, not copies.

vLLM fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj` and pads the vocabulary of the embedding and
the output head; each of our modules gets the matching row range of those `[out, in]` tensors (`narrow` along
dim 0 is a view), the norms get vLLM's own parameters. So the frozen base model exists once in memory: vLLM
serves from it and the trainer differentiates through it. `shared_storage` lets tests prove that.

Trainable state never lives in these views: LoRA adapters are the trainer's own parameters (vLLM serves copies
in its adapter buffers, model.py), and full fine-tuning trains a separate copy (`detach_trainable`), since the
served weights must not change while requests use them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from alchemist_worker.model.config import ModelConfig
from alchemist_worker.model.transformer import Transformer


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _rows(t: Tensor, start: int, length: int) -> nn.Parameter:
    return _frozen(t.detach().narrow(0, start, length))


def build_view_model(served: Any, config: ModelConfig) -> Transformer:
    """A `Transformer` whose every base weight is a view of `served` (an `AlchemistForCausalLM`)."""
    with torch.device("meta"):
        model = Transformer(config)
    inner: Any = served.model
    model.embed_tokens.weight = _rows(inner.embed_tokens.weight, 0, config.vocab_size)
    model.norm.weight = _frozen(inner.norm.weight.detach())
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    else:
        model.lm_head.weight = _rows(served.lm_head.weight, 0, config.vocab_size)
    q, kv, inter = config.q_size, config.kv_size, config.intermediate_size
    for ours_layer, theirs in zip(model.layers, inner.layers, strict=True):
        ours: Any = ours_layer
        attn: Any = ours.self_attn
        mlp: Any = ours.mlp
        qkv = theirs.self_attn.qkv_proj
        for module, start, length in ((attn.q_proj, 0, q), (attn.k_proj, q, kv), (attn.v_proj, q + kv, kv)):
            module.weight = _rows(qkv.weight, start, length)
            if module.bias is not None:
                module.bias = _rows(qkv.bias, start, length)
        attn.o_proj.weight = _frozen(theirs.self_attn.o_proj.weight.detach())
        if attn.o_proj.bias is not None:
            attn.o_proj.bias = _frozen(theirs.self_attn.o_proj.bias.detach())
        gate_up = theirs.mlp.gate_up_proj
        mlp.gate_proj.weight = _rows(gate_up.weight, 0, inter)
        mlp.up_proj.weight = _rows(gate_up.weight, inter, inter)
        mlp.down_proj.weight = _frozen(theirs.mlp.down_proj.weight.detach())
        for name in ("gate_proj", "up_proj"):
            if getattr(mlp, name).bias is not None:
                start = 0 if name == "gate_proj" else inter
                getattr(mlp, name).bias = _rows(gate_up.bias, start, inter)
        if mlp.down_proj.bias is not None:
            mlp.down_proj.bias = _frozen(theirs.mlp.down_proj.bias.detach())
        ours.input_layernorm.weight = _frozen(theirs.input_layernorm.weight.detach())
        ours.post_attention_layernorm.weight = _frozen(theirs.post_attention_layernorm.weight.detach())
        if attn.q_norm is not None and attn.k_norm is not None:
            attn.q_norm.weight = _frozen(theirs.self_attn.q_norm.weight.detach())
            attn.k_norm.weight = _frozen(theirs.self_attn.k_norm.weight.detach())
    leftover = [name for name, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"vLLM's model left {leftover[:4]} without a tensor to view")
    return model.eval()


def shared_storage(model: nn.Module, served: nn.Module) -> tuple[int, int]:
    """(parameters of `model` whose storage lies inside one of `served`'s tensors, all parameters)."""
    spans = []
    for t in list(served.parameters()) + list(served.buffers()):
        if t.numel():
            start = t.untyped_storage().data_ptr()
            spans.append((start, start + t.untyped_storage().nbytes()))
    inside = 0
    params = list(model.parameters())
    for p in params:
        ptr = p.data_ptr()
        inside += any(lo <= ptr < hi for lo, hi in spans)
    return inside, len(params)
