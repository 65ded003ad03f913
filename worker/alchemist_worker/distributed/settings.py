"""Settings of a replica in the data-parallel training group, readable from ALCHEMIST_DP_* variables.

Why these bounds: a round waits for its slowest member, whose local gradient is computed in the slices that
serving leaves; `round_timeout_s` must exceed that (it is the process group's timeout: a member that died or
stalled costs the round after it). An offer expires `member_ttl_s` after its replica stops renewing it, and
the feedback a live replica holds must never look abandoned: the consumer's claim idle time has to exceed both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class DataParallelSettings:
    address: str  # how the other replicas reach this one (its stable pod name), when it leads
    port: int = 29500  # the TCPStore a leader hosts
    backend: str = "auto"  # gloo, nccl, or auto (nccl where CUDA is, else gloo)
    round_timeout_s: float = 40.0
    member_ttl_s: float = 10.0
    poll_s: float = 0.1  # how often an idle group asks whether anyone has samples
    verify_weights: bool = True  # members compare digests of their weights after every step

    def __post_init__(self) -> None:
        if not self.address:
            raise ValueError("ALCHEMIST_DP_ADDRESS must name this replica's address (e.g. its pod DNS name)")
        if not 0 < self.port < 65536:
            raise ValueError(f"ALCHEMIST_DP_PORT must be a TCP port, got {self.port}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"ALCHEMIST_DP_BACKEND must be auto, gloo or nccl, got {self.backend!r}")
        if self.round_timeout_s <= 0 or self.member_ttl_s <= 0 or self.poll_s <= 0:
            raise ValueError("the data-parallel timeouts must be positive")

    @property
    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "nccl" if torch.cuda.is_available() else "gloo"

    def check_claim_idle(self, claim_idle_ms: int) -> None:
        """Raises when a live member's feedback could be claimed by another one (trained twice)."""
        needed = (self.round_timeout_s + self.member_ttl_s) * 1000
        if claim_idle_ms <= needed:
            raise ValueError(
                f"ALCHEMIST_FEEDBACK_CLAIM_IDLE_MS ({claim_idle_ms}) must exceed the round timeout plus the "
                f"member TTL ({needed:.0f} ms) in data-parallel mode"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DataParallelSettings | None:
        """None unless ALCHEMIST_DATA_PARALLEL is set to a true value."""
        env = os.environ if environ is None else environ
        if env.get("ALCHEMIST_DATA_PARALLEL", "").strip().lower() not in TRUE:
            return None
        values: dict[str, object] = {"address": env.get("ALCHEMIST_DP_ADDRESS", "")}
        table = {
            "port": ("ALCHEMIST_DP_PORT", int),
            "backend": ("ALCHEMIST_DP_BACKEND", str),
            "round_timeout_s": ("ALCHEMIST_DP_ROUND_TIMEOUT_SECONDS", float),
            "member_ttl_s": ("ALCHEMIST_DP_MEMBER_TTL_SECONDS", float),
            "poll_s": ("ALCHEMIST_DP_POLL_SECONDS", float),
        }
        for name, (var, parse) in table.items():
            raw = env.get(var, "")
            if raw:
                try:
                    values[name] = parse(raw)
                except ValueError as exc:
                    raise ValueError(f"{var}={raw!r}: {exc}") from None
        if "ALCHEMIST_DP_VERIFY_WEIGHTS" in env:
            values["verify_weights"] = env["ALCHEMIST_DP_VERIFY_WEIGHTS"].strip().lower() in TRUE
        return cls(**values)  # type: ignore[arg-type]
