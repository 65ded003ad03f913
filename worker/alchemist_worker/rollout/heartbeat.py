"""The replica's heartbeat: its loaded version, readiness, feedback lag and any failing commit, with a TTL the
operator reads."""

from __future__ import annotations

import time

from alchemist_protocol.job_store import JobStore
from alchemist_protocol.schemas import ReplicaState


class Heartbeat:
    def __init__(self, store: JobStore, replica: str, interval_s: float = 5.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"the heartbeat interval must be positive, got {interval_s}")
        self.store = store
        self.replica = replica
        self.interval_s = interval_s
        self._next = 0.0

    @property
    def ttl_seconds(self) -> int:
        """Three missed beats and the replica counts as gone."""
        return max(1, round(3 * self.interval_s))

    def due(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self._next

    def beat(
        self, loaded_version: int, ready: bool, feedback_lag: int = 0, commit_error: str = ""
    ) -> ReplicaState:
        state = ReplicaState(
            replica=self.replica,
            loaded_version=loaded_version,
            ready=ready,
            feedback_lag=feedback_lag,
            commit_error=commit_error,
        )
        self.store.report_replica(state, ttl_seconds=self.ttl_seconds)
        self._next = time.monotonic() + self.interval_s
        return state
