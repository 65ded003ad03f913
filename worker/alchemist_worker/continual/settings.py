"""The continual trainer's settings: one validated dataclass, readable from ALCHEMIST_* environment variables.

Training: objective (training/objectives.py: supervised, unlikelihood, kto or dpo, with their weights and the
KL guard), rehearsal of earlier answers, LoRA or full fine-tuning, optimizer, learning rate and schedule, batch
size in samples and in tokens, max staleness, step interval and how often a step becomes a version. Co-scheduling: how long one
training slice may run, and the serving bounds (queue depth, p99 TTFT and inter-token latency) near which
training yields. The operator sets these through the pod's
environment (see `ENV`); the CLI takes the same names as flags.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from alchemist_worker.training.objectives import Objective, ObjectiveConfig


class Method(enum.StrEnum):
    LORA = "lora"
    FULL = "full"


class Mode(enum.StrEnum):
    EXACT = "exact"  # the gradient of a full forward+backward over prompt+response (DESIGN.md §3)
    TRUNCATED = "truncated"  # prompt K/V as constants: backward over the response only; never the default


class Optimizer(enum.StrEnum):
    ADAMW = "adamw"
    SGD = "sgd"


class Schedule(enum.StrEnum):
    CONSTANT = "constant"  # after warmup; online learning has no natural end
    LINEAR = "linear"  # warmup, then linear decay to 0 at total_steps
    COSINE = "cosine"  # warmup, then cosine decay to 0 at total_steps


@dataclass(frozen=True)
class TrainerSettings:
    enabled: bool = True
    objective: Objective = Objective.SUPERVISED
    beta: float = 0.1  # kto, dpo: temperature of the log ratio to the reference (base) model
    desirable_weight: float = 1.0  # weight of accepted and corrected answers
    undesirable_weight: float = 1.0  # weight of rejected answers (unlikelihood, kto)
    kl_weight: float = 0.0  # forgetting guard: KL to the base model per response token; 0 turns it off
    # Forgetting guard: earlier accepted answers added to each step (0 turns it off), from a buffer that keeps
    # `rehearsal_capacity` of them (a uniform sample of all it was offered).
    rehearsal_samples: int = 0
    rehearsal_capacity: int = 512
    method: Method = Method.LORA
    mode: Mode = Mode.EXACT
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    train_embeddings: bool = False  # full fine-tuning: also the embeddings (and an untied output head)
    optimizer: Optimizer = Optimizer.ADAMW
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    schedule: Schedule = Schedule.CONSTANT
    warmup_steps: int = 0
    total_steps: int = 10_000  # decay horizon of the linear and cosine schedules
    batch_samples: int = 8  # at most this many samples per step
    batch_tokens: int = 8192  # and at most this many prompt+response tokens per step
    micro_batch_tokens: int = 2048  # tokens per forward/backward pass; gradients accumulate over a step
    min_batch_samples: int = 1  # a step starts once this many samples wait ...
    step_interval_s: float = 0.0  # ... and at least this long after the previous step started
    max_wait_s: float = 5.0  # or once the oldest waiting sample has waited this long
    max_staleness: int = 4  # a record more than this many versions old is recomputed
    publish_every_steps: int = 1  # every N committed steps become a version
    keep_versions: int = 5  # the last K versions stay on disk (plus any a replica serves)
    # Co-scheduling with serving.
    slice_ms: float = 20.0  # the longest a training slice may run between two engine iterations
    idle_slice_ms: float = 200.0  # ... when nothing is being served
    max_queue_depth: int = 4  # waiting requests at which training yields entirely
    ttft_p99_bound_ms: float = 0.0  # 0: not bounded
    itl_p99_bound_ms: float = 0.0

    def __post_init__(self) -> None:
        positive = ("lora_rank", "batch_samples", "batch_tokens", "micro_batch_tokens", "min_batch_samples")
        for name in (*positive, "publish_every_steps", "keep_versions", "total_steps", "rehearsal_capacity"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("learning_rate", "lora_alpha", "slice_ms", "idle_slice_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        nonneg = (
            "weight_decay",
            "max_grad_norm",
            "warmup_steps",
            "step_interval_s",
            "max_wait_s",
            "rehearsal_samples",
        )
        for name in (*nonneg, "max_staleness", "max_queue_depth", "ttft_p99_bound_ms", "itl_p99_bound_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.min_batch_samples > self.batch_samples:
            raise ValueError(
                f"min_batch_samples ({self.min_batch_samples}) cannot exceed batch_samples ({self.batch_samples})"
            )
        if self.lora_dropout != 0.0:
            raise ValueError(
                f"LoRA dropout {self.lora_dropout} is not supported: training reuses the activations serving "
                "recorded, which dropout would make differ; set it to 0"
            )
        object.__setattr__(self, "objective", Objective(self.objective))  # also from its name
        self.objective_config()  # raises what is wrong with beta and the weights
        if self.method is Method.LORA and not self.lora_target_modules:
            raise ValueError("LoRA needs at least one target module (e.g. q_proj,v_proj)")

    def objective_config(self) -> ObjectiveConfig:
        return ObjectiveConfig(
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
            kl_weight=self.kl_weight,
        )

    def describe(self) -> dict[str, Any]:
        """The settings as plain JSON values, for a version's metadata."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> TrainerSettings:
        """Reads `ENV`'s variables where set; `overrides` (e.g. from CLI flags) win over the environment."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        types = {f.name: f for f in fields(cls)}
        for name, var in ENV.items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            try:
                parse = _PARSERS.get(name) or _parser_for(types[name].type)
                values[name] = parse(raw)
            except ValueError as exc:
                raise ValueError(f"{var}={raw!r}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_(self, **changes: Any) -> TrainerSettings:
        return replace(self, **changes)


def _bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _modules(raw: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in raw.split(",") if m.strip())


def _enum_parser(enum_type: type[enum.StrEnum]) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        return enum_type(raw.strip().lower())

    return parse


def _parser_for(annotation: Any) -> Callable[[str], Any]:
    text = str(annotation)
    if text == "bool":
        return _bool
    if text == "int":
        return int
    if text == "float":
        return float
    for enum_type in (Objective, Method, Mode, Optimizer, Schedule):
        if text == enum_type.__name__:
            return _enum_parser(enum_type)
    raise TypeError(f"no parser for {annotation}")


_PARSERS: dict[str, Callable[[str], Any]] = {"lora_target_modules": _modules}

# Setting name -> environment variable: ALCHEMIST_TRAINING_<NAME>, with the operator's names where they differ.
_RENAMED = {
    "batch_samples": "BATCH_SIZE",
    "min_batch_samples": "MIN_BATCH_SIZE",
    "step_interval_s": "STEP_INTERVAL_SECONDS",
    "max_wait_s": "MAX_WAIT_SECONDS",
    "schedule": "LR_SCHEDULE",
}
ENV: dict[str, str] = {
    f.name: "ALCHEMIST_TRAINING_" + _RENAMED.get(f.name, f.name.upper()) for f in fields(TrainerSettings)
}
