"""FLOP counts of each training path, for the ideal speedup (baseline FLOPs / path FLOPs).

Counts multiply-adds as 2 FLOPs, for matmuls only (linear layers, attention, LM head); elementwise work is
ignored. Attention backward counts 2.5x its forward (five score-sized matmuls against two). With LoRA the
base weights are frozen: backward computes input gradients through them (as much as the forward) and the
adapters' gradients. With full fine-tuning, backward also computes every weight gradient.

The reuse path does: the suffix forward and backward; for every prompt layer but the top, a full backward
plus what the policy recomputes; for the top layer only the K/V projections' backward (nothing above reads
the prompt's top output).
"""

from __future__ import annotations

from dataclasses import dataclass

from alchemist_worker.model.config import ModelConfig


@dataclass(frozen=True)
class Costs:
    """Per-token FLOPs of one layer's pieces."""

    q: float
    k: float
    v: float
    o: float
    gate: float
    up: float
    down: float
    lora: dict[str, float]  # per target: forward FLOPs of x A^T B^T

    @classmethod
    def of(cls, c: ModelConfig, lora_rank: int, targets: tuple[str, ...]) -> Costs:
        dims = {
            "q": (c.hidden_size, c.q_size),
            "k": (c.hidden_size, c.kv_size),
            "v": (c.hidden_size, c.kv_size),
            "o": (c.q_size, c.hidden_size),
            "gate": (c.hidden_size, c.intermediate_size),
            "up": (c.hidden_size, c.intermediate_size),
            "down": (c.intermediate_size, c.hidden_size),
        }
        lora = {name: 2.0 * lora_rank * (i + o) for name, (i, o) in dims.items() if f"{name}_proj" in targets}
        return cls(**{name: 2.0 * i * o for name, (i, o) in dims.items()}, lora=lora)

    def forward(self, names: tuple[str, ...]) -> float:
        return sum(getattr(self, n) + self.lora.get(n, 0.0) for n in names)

    def backward(self, names: tuple[str, ...], full_ft: bool) -> float:
        # input grads through the base weight (1x), weight grads (1x) if full FT; LoRA: dx, dA, dB, x A^T
        return sum(getattr(self, n) * (2.0 if full_ft else 1.0) + 2.0 * self.lora.get(n, 0.0) for n in names)


ALL = ("q", "k", "v", "o", "gate", "up", "down")


def causal_pairs(n: int) -> float:
    return n * (n + 1) / 2


def attention_fwd(c: ModelConfig, pairs: float) -> float:
    return 4.0 * c.num_heads * c.head_dim * pairs


def head_flops(c: ModelConfig, rows: int, full_ft: bool) -> float:
    return 2.0 * c.hidden_size * c.vocab_size * rows * (3.0 if full_ft else 2.0)


def baseline_flops(
    c: ModelConfig, shapes: list[tuple[int, int]], costs: Costs, *, full_ft: bool, checkpointing: bool
) -> float:
    tokens = sum(p + r - 1 for p, r in shapes)
    pairs = sum(causal_pairs(p + r - 1) for p, r in shapes)
    fwd = c.num_layers * (tokens * costs.forward(ALL) + attention_fwd(c, pairs))
    bwd = c.num_layers * (tokens * costs.backward(ALL, full_ft) + 2.5 * attention_fwd(c, pairs))
    rows = sum(r for _, r in shapes)
    return fwd * (2.0 if checkpointing else 1.0) + bwd + head_flops(c, rows, full_ft)


RECOMPUTED = {"kv": ("q", "o", "gate", "up"), "selective": ("q", "o", "gate", "up"), "full": ()}


def reuse_flops(
    c: ModelConfig, shapes: list[tuple[int, int]], costs: Costs, policy: str, *, full_ft: bool
) -> float:
    rows = sum(r for _, r in shapes)
    prefix = sum(p - 1 for p, _ in shapes)
    suffix_pairs = sum(r * (p - 1) + causal_pairs(r) for p, r in shapes)
    prefix_pairs = sum(causal_pairs(p - 1) for p, _ in shapes)
    suffix = c.num_layers * (
        rows * (costs.forward(ALL) + costs.backward(ALL, full_ft)) + 3.5 * attention_fwd(c, suffix_pairs)
    )
    lower = c.num_layers - 1
    replay = lower * (prefix * costs.backward(ALL, full_ft) + 2.5 * attention_fwd(c, prefix_pairs))
    replay += lower * prefix * costs.forward(RECOMPUTED[policy])
    if policy == "kv":
        replay += lower * attention_fwd(c, prefix_pairs)
    top = prefix * costs.backward(("k", "v"), full_ft)
    return suffix + replay + top + head_flops(c, rows, full_ft)
