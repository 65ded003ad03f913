"""The rollout pointer remembered in the job's status, so a Redis that lost its data never rewinds versions.

Pure. Redis holds the pointer the workers follow; a Redis restarted without persistence (or flushed) holds none,
and the state machine would start again from version 0, moving every replica back to the base model. The job's
status keeps the last stable version and the rejected ones (`status.rollout`), which outlive Redis. When Redis
shows no pointer, or an older stable version than the status without a rollback command in Redis naming that
version, the remembered state is written back instead, and the operator posts a `RedisStateLost` Warning.
A canary in progress is not restored (its feedback counters are gone with Redis); it starts again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from alchemist_operator.rollout import RolloutState


def remembered_state(status: Mapping[str, Any]) -> RolloutState | None:
    """The stable and rejected versions the status last recorded, or None when it recorded none."""
    block = status.get("rollout")
    if not isinstance(block, Mapping) or not isinstance(block.get("stableVersion"), int):
        return None
    rejected = tuple(v for v in block.get("rejectedVersions") or () if isinstance(v, int))
    return RolloutState(stable=block["stableVersion"], rejected=rejected)


def rewind_reason(
    in_redis: RolloutState,
    pointer_exists: bool,
    remembered: RolloutState | None,
    rollback_to: int | None,
) -> str | None:
    """Why taking `in_redis` as it is would move replicas back, or None when it is safe.

    `rollback_to`: the version of a rollback command in Redis, which makes an older pointer deliberate.
    """
    if remembered is None:
        return None
    if not pointer_exists:
        if remembered.stable == 0 and not remembered.rejected:
            return None  # nothing to lose: a new job, or one that never moved past the base model
        return (
            f"Redis has no rollout pointer, but the job last served version {remembered.stable}; "
            "Redis lost its data (restarted without persistence, or flushed)"
        )
    if in_redis.stable < remembered.stable and rollback_to != in_redis.stable:
        return (
            f"Redis points at version {in_redis.stable}, older than version {remembered.stable} the job last "
            "served, and holds no rollback command for it"
        )
    return None


def restored_state(in_redis: RolloutState, remembered: RolloutState) -> RolloutState:
    """The remembered stable version, idle, with every version rejected on either side."""
    rejected = tuple(sorted({*remembered.rejected, *in_redis.rejected}))
    return RolloutState(
        stable=remembered.stable,
        rejected=rejected,
        message=f"restored version {remembered.stable} from the job's status after Redis lost its state",
    )
