"""The operator's rollout bookkeeping in Redis, next to the rollout pointer that workers follow.

The pointer (`RolloutPointer` under `JobKeys.rollout`) says which version each replica serves. This record keeps
what the operator needs to judge a canary and to survive a restart or a failover to another operator replica:
the phase, when the canary started, the feedback counters at that moment (gates compare what arrived since), and
the versions that were rolled back and must not be tried again. Both are written in one transaction.
"""

from __future__ import annotations

import time

import redis
from pydantic import BaseModel, ConfigDict, Field

from alchemist_protocol.keys import JobKeys
from alchemist_protocol.schemas import RolloutPointer


def rollout_progress_key(keys: JobKeys) -> str:
    """JSON `RolloutProgress`; a sub-key of the rollout pointer. Written by the operator only."""
    return keys.rollout + ":progress"


class CounterSnapshot(BaseModel):
    model_config = ConfigDict(extra="forbid")

    positive: int = Field(default=0, ge=0)
    total: int = Field(default=0, ge=0)


class RolloutProgress(BaseModel):
    model_config = ConfigDict(extra="forbid")

    phase: str = "Idle"
    started_at: float | None = None
    stable_baseline: CounterSnapshot = Field(default_factory=CounterSnapshot)
    canary_baseline: CounterSnapshot = Field(default_factory=CounterSnapshot)
    rejected_versions: list[int] = Field(default_factory=list)
    message: str = ""
    held_versions: list[int] = Field(default_factory=list)  # held by the evaluation gate, already reported
    updated_at: float = Field(default_factory=time.time)


def load_rollout(client: redis.Redis, keys: JobKeys) -> tuple[RolloutPointer | None, RolloutProgress]:
    """The pointer (None when no operator ever wrote one) and the progress record (fresh when absent)."""
    raw_pointer, raw_progress = client.mget([keys.rollout, rollout_progress_key(keys)])
    pointer = None if raw_pointer is None else RolloutPointer.model_validate_json(raw_pointer)
    progress = (
        RolloutProgress() if raw_progress is None else RolloutProgress.model_validate_json(raw_progress)
    )
    return pointer, progress


def save_rollout(
    client: redis.Redis, keys: JobKeys, pointer: RolloutPointer, progress: RolloutProgress
) -> None:
    """Pointer and progress together: a reader never sees a canary without the record that judges it."""
    pipe = client.pipeline(transaction=True)
    pipe.set(keys.rollout, pointer.model_dump_json())
    pipe.set(rollout_progress_key(keys), progress.model_dump_json())
    pipe.execute()
