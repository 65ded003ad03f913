"""The engine's one validated configuration; components copy out the numbers they need."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RECORDING_POLICIES = ("off", "kv", "selective", "full")
DTYPES = ("auto", "float32", "bfloat16", "float16")
RECORD_DTYPES = ("auto", "bfloat16")  # auto: the model's dtype


class EngineConfigError(ValueError):
    """A configuration the engine cannot run with; the message says which setting to change."""


@dataclass(frozen=True)
class RecordingConfig:
    """Recording at prefill: which policy, which share of requests, and how much memory records may hold.

    `rate` is the probability that a request without an explicit preference is recorded. A request may opt
    in (recorded even when sampling would skip it) or opt out (never recorded), unless the policy is off.
    `dtype` bfloat16 halves an fp32 model's record bytes at the price of approximate gradients
    (docs/serving_benchmark.md measures the error); auto keeps records exact.
    """

    policy: str = "off"
    rate: float = 0.0
    device_budget_bytes: int = 256 << 20
    host_budget_bytes: int = 2 << 30
    seed: int = 0
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.policy not in RECORDING_POLICIES:
            raise EngineConfigError(
                f"recording policy must be one of {RECORDING_POLICIES}, got {self.policy!r}"
            )
        if not 0.0 <= self.rate <= 1.0:
            raise EngineConfigError(f"recording rate must be in [0, 1], got {self.rate}")
        if self.device_budget_bytes < 0 or self.host_budget_bytes < 0:
            raise EngineConfigError("recording budgets must be non-negative")
        if self.dtype not in RECORD_DTYPES:
            raise EngineConfigError(f"record dtype must be one of {RECORD_DTYPES}, got {self.dtype!r}")

    @property
    def enabled(self) -> bool:
        return self.policy != "off"


@dataclass(frozen=True)
class EngineConfig:
    model: Path
    served_model_name: str = ""
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None  # None: the model's max_position_embeddings, capped at 4096
    block_size: int = 16
    kv_cache_bytes: int | None = None  # None: enough for max_num_seqs sequences of max_model_len (capped)
    num_kv_blocks: int | None = None  # overrides kv_cache_bytes (tests)
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None  # None: max(max_model_len, 2048)
    watermark: float = 0.01  # share of KV blocks a new prefill must leave free for running sequences
    seed: int = 0
    cpu_threads: int = 0  # torch's intra-op threads; 0 keeps torch's default (one per core)
    recording: RecordingConfig = RecordingConfig()

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise EngineConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise EngineConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise EngineConfigError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.block_size < 1 or self.block_size > 1024:
            raise EngineConfigError(f"block_size must be in [1, 1024], got {self.block_size}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise EngineConfigError(f"the KV cache budget must be positive, got {self.kv_cache_bytes} bytes")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise EngineConfigError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.max_num_seqs < 1:
            raise EngineConfigError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise EngineConfigError("max_num_batched_tokens must be positive")
        if self.cpu_threads < 0:
            raise EngineConfigError(f"cpu_threads must be 0 (default) or positive, got {self.cpu_threads}")
        if not 0.0 <= self.watermark < 0.5:
            raise EngineConfigError(f"watermark must be in [0, 0.5), got {self.watermark}")
        if not self.model.is_dir():
            raise EngineConfigError(f"model path {self.model} is not a directory holding an HF checkpoint")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.name
