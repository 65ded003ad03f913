"""Byte accounting of co-located training at scale: what a model's prefill records, KV cache, weights and
optimizer state take, what is left for training on one GPU beside serving, and how the record traffic of a
training step compares with the host link's bandwidth and with the step's compute.

Pure functions of a `ModelConfig` (no tensors), so the sizes of models far larger than any test machine can
be planned, and checked against what the recorder and the LoRA code actually allocate on small ones.

Conventions: weights, KV cache and records in `dtype_bytes` (2 for bf16), the softmax log-sum-exp in fp32;
tensor parallelism over `tp` GPUs shards heads and the MLP's intermediate width, while the layer input `x` and
the attention's residual update `o` are whole on every GPU (as Megatron-style TP keeps them).
"""

from __future__ import annotations

from dataclasses import dataclass

from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.model.config import ModelConfig

GB = 10**9
GiB = 1 << 30
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# AdamW bytes per trainable parameter. LoRA adapters train in fp32: parameter, gradient, two moments. Full
# fine-tuning keeps the serving weights in bf16 and adds a bf16 gradient, an fp32 master copy and two moments.
ADAMW_LORA_BYTES = 4 + 4 + 4 + 4
ADAMW_FULL_EXTRA_BYTES = 2 + 4 + 4 + 4
REPLICATED_FIELDS = frozenset({"x", "o"})  # whole on every tensor-parallel rank


def field_widths(c: ModelConfig) -> dict[str, int]:
    """Elements per token and layer of each recordable field (model/layer_activations.py)."""
    return {
        "x": c.hidden_size,
        "q_lin": c.q_size,
        "k_lin": c.kv_size,
        "k": c.kv_size,
        "v": c.kv_size,
        "attn": c.q_size,
        "lse": c.num_heads,
        "o": c.hidden_size,
        "gate": c.intermediate_size,
        "up": c.intermediate_size,
    }


def _kv_heads_per_rank(c: ModelConfig, tp: int) -> int:
    """KV heads shard over up to num_kv_heads ranks; beyond that each rank keeps one (replicated)."""
    return max(1, c.num_kv_heads // tp)


def record_bytes_per_token(c: ModelConfig, policy: RecordingPolicy, *, dtype_bytes: int, tp: int = 1) -> int:
    """Bytes one prompt token's record takes over all layers, on one tensor-parallel rank."""
    widths = field_widths(c)
    kv_share = _kv_heads_per_rank(c, tp) / c.num_kv_heads
    per_layer = 0.0
    for name in policy.fields(c.qk_norm):
        size = 4 if name == "lse" else dtype_bytes
        if name in REPLICATED_FIELDS:
            share = 1.0
        elif name in ("k", "v", "k_lin"):
            share = kv_share
        else:
            share = 1.0 / tp
        per_layer += widths[name] * size * share
    return round(per_layer * c.num_layers)


def kv_cache_bytes_per_token(c: ModelConfig, *, dtype_bytes: int, tp: int = 1) -> int:
    """Serving's KV cache: K and V of every layer, on one tensor-parallel rank."""
    return 2 * c.num_layers * _kv_heads_per_rank(c, tp) * c.head_dim * dtype_bytes


def _linear_shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection of a layer."""
    return {
        "q_proj": (c.hidden_size, c.q_size),
        "k_proj": (c.hidden_size, c.kv_size),
        "v_proj": (c.hidden_size, c.kv_size),
        "o_proj": (c.q_size, c.hidden_size),
        "gate_proj": (c.hidden_size, c.intermediate_size),
        "up_proj": (c.hidden_size, c.intermediate_size),
        "down_proj": (c.intermediate_size, c.hidden_size),
    }


def parameter_count(c: ModelConfig) -> int:
    """Every weight of the model (embeddings, projections with their biases, norms, output head)."""
    shapes = _linear_shapes(c)
    layer = sum(i * o for i, o in shapes.values()) + 2 * c.hidden_size
    if c.qkv_bias:
        layer += c.q_size + 2 * c.kv_size
    if c.o_bias:
        layer += c.hidden_size
    if c.mlp_bias:
        layer += 2 * c.intermediate_size + c.hidden_size
    if c.qk_norm:
        layer += 2 * c.head_dim
    embed = c.vocab_size * c.hidden_size
    head = 0 if c.tie_word_embeddings else embed
    return embed + head + c.num_layers * layer + c.hidden_size


def lora_parameter_count(c: ModelConfig, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """A and B of every targeted projection: rank x (in + out) each, in every layer."""
    shapes = _linear_shapes(c)
    unknown = set(targets) - set(shapes)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {sorted(shapes)}")
    return c.num_layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


def optimizer_bytes(c: ModelConfig, *, lora_rank: int | None, tp: int = 1) -> int:
    """AdamW training state beyond the serving weights on one rank: LoRA (lora_rank) or full fine-tuning (None)."""
    if lora_rank is None:
        return parameter_count(c) * ADAMW_FULL_EXTRA_BYTES // tp
    return lora_parameter_count(c, lora_rank) * ADAMW_LORA_BYTES // tp


@dataclass(frozen=True)
class GpuPlan:
    """One GPU's memory with serving and training co-located (bytes)."""

    gpu: int
    weights: int
    serving_kv: int  # KV cache reserved for serving
    optimizer: int
    left: int  # for training activations and device-tier records (negative: does not fit)

    def prompt_tokens_of_records(self, record_per_token: int) -> int:
        """Prompt tokens whose records fit in what is left (all of it given to the device tier)."""
        return max(0, self.left) // record_per_token


def plan_gpu(
    c: ModelConfig,
    *,
    gpu_bytes: int,
    serving_kv_tokens: int,
    lora_rank: int | None,
    dtype_bytes: int = 2,
    tp: int = 1,
) -> GpuPlan:
    weights = parameter_count(c) * dtype_bytes // tp
    kv = serving_kv_tokens * kv_cache_bytes_per_token(c, dtype_bytes=dtype_bytes, tp=tp)
    optimizer = optimizer_bytes(c, lora_rank=lora_rank, tp=tp)
    return GpuPlan(gpu_bytes, weights, kv, optimizer, gpu_bytes - weights - kv - optimizer)


def step_transfer_bytes_per_prompt_token(
    c: ModelConfig, policy: RecordingPolicy, *, dtype_bytes: int, tp: int = 1
) -> int:
    """Host-to-device bytes a training step moves per reused prompt token when its records wait on the host:
    every layer's record once for the forward (the response attends to its K/V) and once for the backward."""
    return 2 * record_bytes_per_token(c, policy, dtype_bytes=dtype_bytes, tp=tp)


def replay_flops_per_prompt_token(c: ModelConfig, policy: RecordingPolicy) -> float:
    """Matmul FLOPs of the reuse path's backward per prompt token with LoRA (input gradients through every
    projection, as much as their forward), plus the projections the policy recomputes. Attention, which grows
    with the prompt's length, and the rank-r adapters are left out: a lower bound on the compute that can hide
    the transfer."""
    shapes = _linear_shapes(c)
    backward = sum(2.0 * i * o for i, o in shapes.values())
    recomputed = ("q_proj", "o_proj", "gate_proj", "up_proj") if policy is not RecordingPolicy.FULL else ()
    return c.num_layers * (backward + sum(2.0 * shapes[n][0] * shapes[n][1] for n in recomputed))
