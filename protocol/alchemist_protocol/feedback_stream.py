"""Reading the state of the feedback stream's consumer group, and trimming what the group is done with.

Shared by the worker (lag metrics, back-pressure, retention) and the operator (lag in the job's status). Every
read here touches entry ids only, or goes through a client whose replies are bytes (`bytes_twin`), so an entry
that is not UTF-8 cannot make it fail.

Retention never drops an entry the group has not acknowledged: entries after the group's last-delivered id are
still to be delivered, and pending ones are still to be trained. Below the lowest pending id everything is
acknowledged, so `XTRIM MINID` to it is safe; entries acknowledged above it (while an old one is still pending)
are only deleted, oldest first, when the stream exceeds a length bound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from alchemist_protocol.redis_connection import text

# Beyond this many undelivered entries, counting them on a Redis < 7 costs more than the number is worth.
LAG_COUNT_CAP = 100_000
# Most entries the length backstop examines per call; the next call goes on.
BACKSTOP_SCAN = 500


@dataclass(frozen=True)
class FeedbackLag:
    entries: int  # in the stream and not yet acknowledged by the group (undelivered + pending)
    seconds: float  # age of the oldest of them; 0 when none


def entry_time(entry_id: str) -> float:
    """Seconds since the epoch at which Redis added the entry (stream ids start with milliseconds)."""
    return int(entry_id.split("-", 1)[0]) / 1000.0


def next_entry_id(entry_id: str) -> str:
    """The smallest id after `entry_id`."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def group_info(client: redis.Redis, stream: str, group: str) -> dict[str, Any] | None:
    """XINFO GROUPS entry of `group` (keys as text), or None when the stream or the group does not exist."""
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:  # no such stream
        return None
    for info in groups:
        named = {text(k): v for k, v in info.items()}
        if text(named.get("name")) == group:
            return named
    return None


def feedback_lag(raw: redis.Redis, stream: str, group: str, cap: int = LAG_COUNT_CAP) -> FeedbackLag:
    """What the group has not acknowledged yet, and how old the oldest is. `raw`: a bytes client."""
    info = group_info(raw, stream, group)
    if info is None:  # nobody consumes yet: everything in the stream waits
        length = min(int(raw.xlen(stream)), cap)
        first = raw.xrange(stream, count=1) if length else []
        return FeedbackLag(length, _age(text(first[0][0])) if first else 0.0)
    pending = int(info.get("pending") or 0)
    last = text(info.get("last-delivered-id")) or "0-0"
    undelivered_raw = info.get("lag")
    if undelivered_raw is None:  # Redis < 7 (or a lag it cannot tell): count what follows the last delivered
        undelivered = len(raw.xrange(stream, min=f"({last}", count=cap))
    else:
        undelivered = int(undelivered_raw)
    oldest = ""
    if pending:
        summary = raw.xpending(stream, group)
        oldest = text(summary.get("min")) if summary else ""
    elif undelivered:
        first = raw.xrange(stream, min=f"({last}", count=1)
        oldest = text(first[0][0]) if first else ""
    return FeedbackLag(min(pending + undelivered, cap), _age(oldest) if oldest else 0.0)


def _age(entry_id: str) -> float:
    return max(0.0, time.time() - entry_time(entry_id))


def trim_acknowledged(raw: redis.Redis, stream: str, group: str, max_len: int = 0) -> int:
    """Deletes entries the group acknowledged; returns how many. `raw`: a bytes client.

    Everything below the lowest pending id (or up to the last delivered one, when none is pending) goes. When
    the stream is still longer than `max_len` (0: no bound), acknowledged entries above the lowest pending id
    go too, oldest first, at most BACKSTOP_SCAN examined per call. Unacknowledged entries always stay, so the
    stream can exceed `max_len` only by what is still to be trained.
    """
    info = group_info(raw, stream, group)
    if info is None:  # without the group nobody can tell what was consumed
        return 0
    last = text(info.get("last-delivered-id")) or "0-0"
    pending = int(info.get("pending") or 0)
    lowest = text(raw.xpending(stream, group).get("min")) if pending else ""
    # Entries at or below `last` were all delivered; those not pending were acknowledged.
    removed = int(raw.xtrim(stream, minid=lowest or next_entry_id(last), approximate=False))
    if max_len > 0 and lowest:
        excess = int(raw.xlen(stream)) - max_len
        if excess > 0:
            removed += _delete_acknowledged_above(raw, stream, group, lowest, last, excess)
    return removed


def _delete_acknowledged_above(
    raw: redis.Redis, stream: str, group: str, lowest: str, last: str, excess: int
) -> int:
    scanned = [text(eid) for eid, _ in raw.xrange(stream, min=f"({lowest}", max=last, count=BACKSTOP_SCAN)]
    if not scanned:
        return 0
    still_pending = {
        text(p["message_id"])
        for p in raw.xpending_range(stream, group, min=scanned[0], max=scanned[-1], count=len(scanned))
    }
    done = [eid for eid in scanned if eid not in still_pending][:excess]
    return int(raw.xdel(stream, *done)) if done else 0
