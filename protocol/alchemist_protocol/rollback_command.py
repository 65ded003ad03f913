"""A person's rollback: every replica back to a kept version, and the trainer continuing from it.

The same two writes the operator makes when it rolls a canary back, for a version a person names: the
`RollbackRequest` the trainer honours (`JobStore.request_rollback`'s message) and, where an operator manages the
rollout pointer, the pointer at that version with every newer version rejected, so the rollout does not move
forward again to what was just left. The versions the trainer publishes next (children of the named version) roll
out as usual. The operator accepts the older pointer because the rollback request names it (`rollout_memory`).
Without a pointer (a worker run without an operator) only the request is written: replicas that follow the latest
version go back to it by themselves, and writing a pointer would switch them to following one.

All of it is one transaction that watches the version index and the rollout keys, so a version published or a
rollout decision written in between makes it start over with what is there now. A decision the operator computed
just before and writes just after is caught afterwards (`overwritten`) and the rollback written again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from alchemist_protocol.keys import JobKeys
from alchemist_protocol.rollout_state import RolloutProgress, load_rollout, rollout_progress_key
from alchemist_protocol.schemas import RollbackRequest, RolloutPointer


@dataclass(frozen=True)
class RollbackOutcome:
    request: RollbackRequest
    pointer: RolloutPointer | None  # None: no operator manages this job's rollout
    rejected: tuple[int, ...]  # versions newer than the target that the rollout will not serve again


def roll_back(client: redis.Redis, keys: JobKeys, version: int, reason: str = "") -> RollbackOutcome:
    """Raises ValueError for a version that is not published (version 0, the base model, always is)."""
    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(keys.versions, keys.rollout, rollout_progress_key(keys))
                published = sorted(int(v) for v in client.zrange(keys.versions, 0, -1))
                if version != 0 and (version not in published or not pipe.exists(keys.version(version))):
                    raise ValueError(
                        f"version {version} is not published (or no longer kept); known: {published}"
                    )
                request = RollbackRequest(
                    version=version, superseded_up_to=max(published, default=0), reason=reason
                )
                pointer, progress = load_rollout(pipe, keys)
                newer = tuple(v for v in published if v > version)
                pipe.multi()
                pipe.set(keys.rollback, request.model_dump_json())
                if pointer is not None:
                    pointer = RolloutPointer(stable_version=version)
                    message = f"rolled back to version {version} by hand" + (f": {reason}" if reason else "")
                    progress = RolloutProgress(
                        rejected_versions=sorted({*progress.rejected_versions, *newer}), message=message
                    )
                    pipe.set(keys.rollout, pointer.model_dump_json())
                    pipe.set(rollout_progress_key(keys), progress.model_dump_json())
                pipe.execute()
                return RollbackOutcome(request, pointer, newer if pointer is not None else ())
            except redis.WatchError:
                continue


def overwritten(client: redis.Redis, keys: JobKeys, outcome: RollbackOutcome) -> bool:
    """Whether a rollout decision taken before the rollback (and written after it) replaced its pointer.

    The operator writes the pointer without watching it, so a decision it computed from what it read just before
    the rollback lands afterwards and drops the versions the rollback rejected. A pointer that moved on for a
    legitimate reason (a child of the rolled-back version rolled out) keeps them rejected.
    """
    if outcome.pointer is None:
        return False
    pointer, progress = load_rollout(client, keys)
    if pointer is None or pointer.stable_version < outcome.request.version:
        return True
    return not set(outcome.rejected) <= set(progress.rejected_versions)


def roll_back_and_settle(
    client: redis.Redis,
    keys: JobKeys,
    version: int,
    reason: str = "",
    settle_s: float = 2.0,
    attempts: int = 3,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[RollbackOutcome, int]:
    """`roll_back`, then, after `settle_s` (longer than an operator's decision takes), again if a decision racing
    with it replaced its pointer; at most `attempts` times. Returns the last outcome and how often it was redone."""
    outcome = roll_back(client, keys, version, reason)
    redone = 0
    while settle_s > 0 and redone < attempts - 1:
        sleep(settle_s)
        if not overwritten(client, keys, outcome):
            break
        outcome = roll_back(client, keys, version, reason)
        redone += 1
    return outcome, redone
