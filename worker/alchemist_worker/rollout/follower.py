"""Which version this replica must serve, from the rollout pointer or, without an operator, the latest.

Modes:
- `pointer`: the rollout pointer the operator writes (stable version, or the canary version for canary
  replicas). Without a pointer the replica keeps what it serves.
- `latest`: every newly published version as soon as it exists, except after a rollback command, which holds
  serving at the rolled-back version until the trainer publishes past it, and except versions the evaluation
  gate held back (the newest version it passed is served instead). It never moves to an older version
  otherwise (after a Redis restart the index may be empty until the trainer rebuilds it from disk).
- `auto` (default): `pointer` when the job has a pointer (an operator manages it), `latest` otherwise; so a
  local run follows training at once and a managed one waits for the operator's rollout.
The decision is a pure function; `RolloutFollower` only fetches its inputs.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from alchemist_protocol.job_store import JobStore
from alchemist_protocol.schemas import RollbackRequest, RolloutPointer


class FollowMode(enum.StrEnum):
    AUTO = "auto"
    POINTER = "pointer"
    LATEST = "latest"


def target_version(
    mode: FollowMode,
    replica: str,
    pointer: RolloutPointer | None,
    latest: int,
    rollback: RollbackRequest | None,
    serving: int,
    servable: int | None = None,
) -> int | None:
    """The version to serve, or None for "no instruction, keep serving what you serve".

    `servable`: the newest published version the evaluation gate did not hold (default: `latest`)."""
    if mode is FollowMode.POINTER or (mode is FollowMode.AUTO and pointer is not None):
        return None if pointer is None else pointer.version_for(replica)
    if rollback is not None and rollback.applies_to(latest):
        return rollback.version
    newest = latest if servable is None else servable
    return newest if newest > serving else None


@dataclass
class FollowDecision:
    target: int | None
    available: bool  # the target's files are present (version 0, the base model, always is)


class RolloutFollower:
    def __init__(
        self,
        store: JobStore,
        replica: str,
        mode: FollowMode,
        is_available: Callable[[int], bool],
    ) -> None:
        self.store = store
        self.replica = replica
        self.mode = mode
        self.is_available = is_available

    def decide(self, serving: int) -> FollowDecision:
        pointer = self.store.get_rollout() if self.store.has_rollout() else None
        latest = self.store.latest_version()
        servable = self.store.latest_servable_version() if pointer is None else latest
        rollback = self.store.get_rollback()
        target = target_version(self.mode, self.replica, pointer, latest, rollback, serving, servable)
        return FollowDecision(target, target is not None and (target == 0 or self.is_available(target)))
