"""A version commit in progress: kept as is until it succeeds, retried on a timer, and reported while it fails.

Why keep it: the draft holds the trained weights, the version number and the feedback ids. Retrying that very
draft, rather than training on and committing the next step, is what keeps a failure half-way (the directory
written, Redis down) from turning into two sibling versions that both list the same feedback. The control thread
starts no step while a commit is pending, and retries it with exponential back-off whether or not new feedback
arrives. Imports no torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from alchemist_worker.versions.publisher import CommitFailure, VersionDraft


def retry_delay(failures: int, first_s: float, max_s: float) -> float:
    """Back-off before retry number `failures` (1-based): first_s, doubling, at most max_s."""
    if failures < 1:
        return 0.0
    return float(min(max_s, first_s * 2 ** min(failures - 1, 32)))


@dataclass
class PendingCommit:
    """A finished step (or several) on its way to becoming a version."""

    snapshot: dict[str, Any]  # the trained weights to write
    state: dict[str, Any]  # the trainer state to write with them
    steps: int  # steps it contains, counted as committed only once it is
    draft: VersionDraft | None = None  # built at the first attempt that reaches Redis, then never changed
    published: bool = False  # Redis lists it; only acknowledging its feedback is left
    failures: int = 0
    next_at: float = 0.0  # monotonic time of the next attempt

    def due(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self.next_at

    def failed(self, first_s: float, max_s: float, now: float | None = None) -> float:
        """Counts a failure and schedules the next attempt; returns the delay."""
        self.failures += 1
        delay = retry_delay(self.failures, first_s, max_s)
        self.next_at = (time.monotonic() if now is None else now) + delay
        return delay


@dataclass
class CommitHealth:
    """What /v1/versions and the heartbeat show of commits: failures by class and the error not yet resolved."""

    failures: dict[str, int] = field(default_factory=lambda: {"conflict": 0, "io": 0, "redis": 0})
    last_error: dict[str, Any] | None = None
    unresolved: str = ""  # "class: message" while a commit keeps failing; "" once one succeeds
    last_committed: int | None = None

    def record_failure(self, failure: CommitFailure, version: int | None, retrying: bool) -> None:
        self.failures[failure.kind] = self.failures.get(failure.kind, 0) + 1
        self.last_error = {
            "class": failure.kind,
            "message": str(failure),
            "version": version,
            "at": time.time(),
        }
        self.unresolved = f"{failure.kind}: {failure}" if retrying else ""

    def record_success(self, version: int) -> None:
        self.last_committed = version
        self.unresolved = ""

    def snapshot(self, pending: PendingCommit | None) -> dict[str, Any]:
        state = "idle" if pending is None else "retrying" if pending.failures else "committing"
        return {
            "state": state,
            "version": None if pending is None or pending.draft is None else pending.draft.version,
            "attempts_failed": 0 if pending is None else pending.failures,
            "next_retry_in_s": (
                None
                if pending is None or not pending.failures
                else max(0.0, pending.next_at - time.monotonic())
            ),
            "unresolved_error": self.unresolved,
            "failures": dict(self.failures),
            "last_error": self.last_error,
            "last_committed_version": self.last_committed,
        }
