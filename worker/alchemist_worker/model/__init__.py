"""A Llama-family decoder in plain torch with HF checkpoint loading, the attention-backend contract the
serving engine implements, and the per-layer recording hook (see each module's docstring)."""

from alchemist_worker.model.attention import AttentionBackend, DenseCausalAttention, varlen_attention
from alchemist_worker.model.checkpoint import CheckpointError, load_model
from alchemist_worker.model.config import ConfigError, ModelConfig
from alchemist_worker.model.layer_activations import LayerActivations, Recorder
from alchemist_worker.model.tokenizer import Tokenizer
from alchemist_worker.model.transformer import Transformer

__all__ = [
    "AttentionBackend",
    "CheckpointError",
    "ConfigError",
    "DenseCausalAttention",
    "LayerActivations",
    "ModelConfig",
    "Recorder",
    "Tokenizer",
    "Transformer",
    "load_model",
    "varlen_attention",
]
