"""Settings of `alchemist-worker serve`, from command-line flags and ALCHEMIST_* environment variables.

A flag wins over its environment variable, which wins over the default. The operator configures pods through
the environment; people use flags. Every option is listed once in OPTIONS with its flag, variable and type.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alchemist_protocol.log_format import LOG_FORMATS
from alchemist_worker.engine.config import (
    DTYPES,
    RECORD_DTYPES,
    RECORDING_POLICIES,
    EngineConfig,
    RecordingConfig,
)

MIB = 1 << 20
ENGINES = ("native", "vllm")


@dataclass(frozen=True)
class Option:
    name: str  # attribute of ServeSettings; the flag is --name-with-dashes, the variable ALCHEMIST_NAME
    type: Callable[[str], Any]
    default: Any
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "ALCHEMIST_" + self.name.upper()


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


OPTIONS: tuple[Option, ...] = (
    Option("model", Path, None, "HF checkpoint directory to serve (required)"),
    Option(
        "engine", str, "native", "serving engine: native (built in) or vllm (vLLM 0.32 in-process)", ENGINES
    ),
    Option(
        "vllm_compile",
        _bool,
        True,
        "vllm engine: torch.compile and CUDA graphs (false: eager, faster start, slower steps)",
    ),
    Option(
        "vllm_model_class",
        str,
        "alchemist",
        "vllm engine: alchemist (records and trains) or stock (vLLM's own classes: serving only, benchmarks)",
        ("alchemist", "stock"),
    ),
    Option(
        "vllm_share_weights",
        _bool,
        False,
        "vllm engine: keep weights plain for the trainer even without Redis (always on when training runs)",
    ),
    Option("served_model_name", str, "", "model name clients use (default: the directory name)"),
    Option("host", str, "127.0.0.1", "address to listen on"),
    Option("port", int, 8000, "port to listen on"),
    Option(
        "dtype", str, "auto", "weights and KV cache dtype (auto: bfloat16 on CUDA, float32 on CPU)", DTYPES
    ),
    Option("device", str, "auto", "auto, cpu, cuda or cuda:N"),
    Option("max_model_len", int, None, "context length in tokens (default: the model's, capped at 4096)"),
    Option("kv_cache_mib", float, 1024.0, "KV cache budget in MiB"),
    Option("block_size", int, 16, "tokens per KV cache block"),
    Option("max_num_seqs", int, 64, "most requests decoded together"),
    Option(
        "max_num_batched_tokens", int, None, "prefill token budget per iteration (default max(2048, context))"
    ),
    Option(
        "record_policy", str, "off", "what prefill records keep (off disables recording)", RECORDING_POLICIES
    ),
    Option("record_rate", float, 0.1, "share of requests recorded unless they opt in or out"),
    Option("record_device_mib", float, 256.0, "device-memory budget of prefill records in MiB"),
    Option("record_host_mib", float, 2048.0, "host-memory budget of prefill records in MiB (spill tier)"),
    Option(
        "record_dtype",
        str,
        "auto",
        "element type of records: auto (the model's, exact gradients) or bfloat16 (half the bytes, approximate)",
        RECORD_DTYPES,
    ),
    Option("redis_url", str, "", "Redis for request records (tokens, replica, version); empty: not written"),
    Option("namespace", str, "default", "job namespace (Redis key prefix)"),
    Option("job", str, "local", "job name (Redis key prefix)"),
    Option("feedback_stream", str, "", "feedback stream key (empty: alchemist:{namespace}:{job}:feedback)"),
    Option("replica", str, socket.gethostname(), "this replica's name"),
    Option("request_ttl_s", int, 86_400, "how long request records live in Redis"),
    Option("weight_version", int, 0, "version of the weights being served at start"),
    Option("shutdown_timeout_s", float, 30.0, "on SIGTERM, how long in-flight requests may take to finish"),
    Option("seed", int, 0, "seed of sampling without a request seed, and of the recording coin"),
    Option("cpu_threads", int, 0, "torch CPU threads for the engine (0: torch's default, one per core)"),
    Option("log_level", str, "info", "log level", ("debug", "info", "warning", "error")),
    Option(
        "log_format",
        str,
        "text",
        "log lines as text or JSON objects (with request and response ids)",
        LOG_FORMATS,
    ),
    Option("max_body_bytes", int, 4 * MIB, "request bodies larger than this get 413 before they are parsed"),
    Option("tokenizer_threads", int, 2, "threads that tokenize prompts off the event loop"),
)


@dataclass(frozen=True)
class ServeSettings:
    model: Path
    engine: str
    vllm_compile: bool
    vllm_model_class: str
    vllm_share_weights: bool
    served_model_name: str
    host: str
    port: int
    dtype: str
    device: str
    max_model_len: int | None
    kv_cache_mib: float
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int | None
    record_policy: str
    record_rate: float
    record_device_mib: float
    record_host_mib: float
    record_dtype: str
    redis_url: str
    namespace: str
    job: str
    feedback_stream: str
    replica: str
    request_ttl_s: int
    weight_version: int
    shutdown_timeout_s: float
    seed: int
    cpu_threads: int
    log_level: str
    log_format: str
    max_body_bytes: int
    tokenizer_threads: int

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            served_model_name=self.served_model_name,
            dtype=self.dtype,
            device=self.device,
            max_model_len=self.max_model_len,
            block_size=self.block_size,
            kv_cache_bytes=int(self.kv_cache_mib * MIB),
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            seed=self.seed,
            cpu_threads=self.cpu_threads,
            recording=RecordingConfig(
                policy=self.record_policy,
                rate=self.record_rate,
                device_budget_bytes=int(self.record_device_mib * MIB),
                host_budget_bytes=int(self.record_host_mib * MIB),
                seed=self.seed,
                dtype=self.record_dtype,
            ),
        )


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds every option as a flag whose default is None, so that an absent flag falls back to the env."""
    for option in OPTIONS:
        parser.add_argument(
            option.flag,
            dest=option.name,
            type=option.type,
            default=None,
            choices=option.choices,
            help=f"{option.help} [env {option.env}]",
        )


def resolve_settings(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ServeSettings:
    """Flag, else environment variable, else default; raises ValueError naming the bad variable."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for option in OPTIONS:
        value = getattr(args, option.name, None)
        if value is None and env.get(option.env, "") != "":
            raw = env[option.env]
            try:
                value = option.type(raw)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise ValueError(f"{option.env}={raw!r} is invalid: {exc}") from exc
            if option.choices is not None and value not in option.choices:
                raise ValueError(f"{option.env}={raw!r} must be one of {option.choices}")
        values[option.name] = option.default if value is None else value
    if values["model"] is None:
        raise ValueError("no model given: pass --model PATH or set ALCHEMIST_MODEL")
    return ServeSettings(**values)
