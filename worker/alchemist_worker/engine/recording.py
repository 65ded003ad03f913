"""Which requests are recorded at prefill, and the seam through which a prefill batch gets its recorder.

The engine asks `RecordSampler.decide` once per request, when it arrives: the request's own preference wins
(opt-in or opt-out), otherwise a seeded coin with the configured rate decides. The decision is made before
the request is ever scheduled, so a recording never depends on how requests happen to be batched.

`PrefillRecording` is what the engine needs from the activation store's side: a recorder for one prefill
batch (told which sequences of the flat batch to keep, under which record id), a commit after the forward
pass (or a discard when it failed), and statistics for metrics. Decode steps never get a recorder.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from alchemist_worker.engine.config import RecordingConfig

if TYPE_CHECKING:  # keeps this module free of torch at run time
    from alchemist_worker.model.layer_activations import Recorder


class RecordSampler:
    def __init__(self, config: RecordingConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)

    def decide(self, preference: bool | None) -> bool:
        if not self.config.enabled:
            return False
        if preference is not None:
            return preference
        return self.config.rate > 0.0 and self._rng.random() < self.config.rate


@dataclass(frozen=True)
class RecordingStats:
    recorded_requests: int = 0
    bytes_by_tier: dict[str, int] = field(default_factory=dict)
    evicted: int = 0


class PrefillRecording(Protocol):
    @property
    def policy(self) -> str: ...

    def begin(
        self, cu_seqlens: list[int], input_ids: list[int], record_ids: list[str | None], weight_version: int
    ) -> Recorder:
        """A recorder for one prefill forward over a flat batch: sequence i owns tokens
        cu_seqlens[i]:cu_seqlens[i+1] of input_ids and is recorded under record_ids[i] unless that is None."""
        ...

    def commit(self, recorder: Recorder) -> None:
        """Hands what `recorder` kept to the store, one record per record id; called after the forward pass."""
        ...

    def discard(self, recorder: Recorder) -> None:
        """Drops `recorder` without storing anything; called instead of commit when the forward pass failed."""
        ...

    def stats(self) -> RecordingStats: ...
