"""The model's configuration, validated from a Hugging Face `config.json`.

One frozen dataclass holds every number the model, the engine and the trainer need. Reading it from a
checkpoint is the only place that knows how HF spells things (`rope_parameters` in transformers 5,
`rope_theta` + `rope_scaling` before), so an unsupported architecture or a malformed file fails here with a
message naming the field, before any weight is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# model_type -> (qkv bias, o_proj bias default, QK norm). Each is a Llama-family decoder with SwiGLU and RMSNorm.
SUPPORTED_ARCHITECTURES: dict[str, tuple[bool, bool, bool]] = {
    "llama": (False, False, False),
    "mistral": (False, False, False),
    "qwen2": (True, False, False),
    "qwen3": (False, False, True),
}
SUPPORTED_ROPE_TYPES = ("default", "llama3")


class ConfigError(ValueError):
    """A checkpoint's configuration that this model cannot run, with what is wrong in the message."""


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's frequency-dependent RoPE scaling (long wavelengths divided by `factor`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Llama3RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # Mistral's sliding window: a token attends to itself and the `sliding_window - 1` tokens before it.
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive or null, got {self.sliding_window}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Validates an HF config dict; raises ConfigError naming the unsupported or malformed field."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture model_type={model_type!r} (architectures={hf.get('architectures')}); "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        qkv_bias, o_bias, qk_norm = SUPPORTED_ARCHITECTURES[model_type]
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r} is not supported (only silu, i.e. SwiGLU)")
        if model_type in ("llama", "qwen3"):
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        if hf.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"pretraining_tp={hf['pretraining_tp']} is not supported (only 1)")
        sliding_window = _sliding_window(model_type, hf)
        num_heads = _required_int(hf, "num_attention_heads")
        hidden = _required_int(hf, "hidden_size")
        head_dim = hf.get("head_dim") or (hidden // num_heads if num_heads else 0)
        theta, scaling = _rope(hf)
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=model_type,
            vocab_size=_required_int(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_required_int(hf, "intermediate_size"),
            num_layers=_required_int(hf, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=qk_norm,
            sliding_window=sliding_window,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"{config_file} does not exist: not an HF checkpoint directory")
        try:
            hf = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{config_file} is not valid JSON: {exc}") from exc
        if not isinstance(hf, dict):
            raise ConfigError(f"{config_file} must hold a JSON object")
        return cls.from_hf(hf)


def _required_int(hf: dict[str, Any], key: str) -> int:
    value = hf.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"config field {key!r} must be an integer, got {value!r}")
    return value


def _sliding_window(model_type: str, hf: dict[str, Any]) -> int | None:
    window = hf.get("sliding_window")
    if model_type == "mistral":
        return int(window) if window else None
    if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise ConfigError(f"{model_type} with use_sliding_window=true is not supported")
    return None


def _rope(hf: dict[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    """(theta, scaling) from transformers 5's `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    params = {**legacy, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope_type={rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if rope_type == "default":
        return float(theta), None
    try:
        scaling = Llama3RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as exc:
        raise ConfigError(f"llama3 rope scaling lacks {exc.args[0]!r}") from exc
    return float(theta), scaling
