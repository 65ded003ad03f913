"""Where the evaluation set is and how far a candidate may fall behind, from ALCHEMIST_EVALUATION_* variables.

The operator sets them from the job's `spec.evaluation` (a path in the image or a volume, or a ConfigMap it
mounts); without ALCHEMIST_EVALUATION_SET there is no gate and versions carry no reading.

`on_held` is what the trainer does after the gate held a version. `revert` (the default): training continues
from the held version's parent, so the next candidate does not build on what the gate refused (a run of wrong
corrections stays out of every later version; the held version's feedback is not trained again). `continue`:
training goes on from the held version, as if it had passed; later versions are still judged against the base,
so a drift is held, but a harm that stays within the bounds against the base is kept.

`held_backoff` (under `revert`): the learning rate of the steps trained from a version is multiplied by this
factor once per candidate the gate held in a row from that version. Without it the replica keeps serving the
parent, the application sends the same feedback again, and retraining it from the same weights at the same rate
makes the same held candidate every time: learning stops at the first held version for good. A smaller step
moves the model less, so a retrain eventually passes and learning goes on from there. The count is read from the
published versions (evaluation/gate.py: `consecutive_holds`), so a restarted trainer and every data-parallel
member use the same rate. 1 turns it off.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from alchemist_worker.evaluation.gate import GateBounds

ENV = {
    "path": "ALCHEMIST_EVALUATION_SET",
    "max_perplexity_increase": "ALCHEMIST_EVALUATION_MAX_PERPLEXITY_INCREASE",
    "max_reference_nll_increase": "ALCHEMIST_EVALUATION_MAX_REFERENCE_NLL_INCREASE",
    "max_exact_match_drop": "ALCHEMIST_EVALUATION_MAX_EXACT_MATCH_DROP",
    "max_tokens": "ALCHEMIST_EVALUATION_MAX_TOKENS",
    "on_held": "ALCHEMIST_EVALUATION_ON_HELD",
    "held_backoff": "ALCHEMIST_EVALUATION_HELD_BACKOFF",
}


class OnHeld(enum.StrEnum):
    REVERT = "revert"  # the next step trains from the held version's parent
    CONTINUE = "continue"  # the next step trains from the held version


@dataclass(frozen=True)
class EvaluationSettings:
    path: Path | None = None
    bounds: GateBounds = field(default_factory=GateBounds)
    max_tokens: int = 512  # the longest sequence scored at once; longer text is scored in windows
    on_held: OnHeld = OnHeld.REVERT
    held_backoff: float = 0.5

    def __post_init__(self) -> None:
        if self.max_tokens < 2:
            raise ValueError(f"{ENV['max_tokens']} must be at least 2, got {self.max_tokens}")
        if not 0 < self.held_backoff <= 1:
            raise ValueError(f"{ENV['held_backoff']} must be in (0, 1], got {self.held_backoff}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EvaluationSettings:
        env = os.environ if environ is None else environ
        raw_path = env.get(ENV["path"], "").strip()
        bounds: dict[str, float] = {}
        max_tokens, on_held, held_backoff = cls.max_tokens, cls.on_held, cls.held_backoff
        for name, var in ENV.items():
            raw = env.get(var, "").strip()
            if not raw or name == "path":
                continue
            try:
                if name == "max_tokens":
                    max_tokens = int(raw)
                elif name == "on_held":
                    on_held = OnHeld(raw.lower())
                elif name == "held_backoff":
                    held_backoff = float(raw)
                else:
                    bounds[name] = float(raw)
            except ValueError as exc:
                raise ValueError(f"{var}={raw!r}: {exc}") from None
        try:
            gate = GateBounds(**bounds)
        except ValueError as exc:
            raise ValueError(f"ALCHEMIST_EVALUATION_*: {exc}") from None
        return cls(
            path=Path(raw_path) if raw_path else None,
            bounds=gate,
            max_tokens=max_tokens,
            on_held=on_held,
            held_backoff=held_backoff,
        )
