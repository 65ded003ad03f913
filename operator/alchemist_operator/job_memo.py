"""What the operator remembers between handler calls: shared context, and per-job state in kopf's memo.

kopf hands every handler of one object the same memo, a shallow copy of the operator-wide one given at start.
The spec handler leaves its outcome here and wakes the job's monitor, which is the only writer of the status.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from alchemist_protocol.job_store import JobStore

from alchemist_operator.cluster_api import ClusterApi
from alchemist_operator.job_metrics import JobMetrics
from alchemist_operator.job_spec import JobSpec
from alchemist_operator.job_status import Blocker, ReconcileOutcome
from alchemist_operator.operator_config import OperatorConfig


@dataclass
class JobMemo:
    config: OperatorConfig
    cluster: ClusterApi
    spec: JobSpec | None = None  # the last valid spec, the one the children were built from
    outcome: ReconcileOutcome | None = None
    last_status: dict[str, Any] | None = None
    store: JobStore | None = None
    store_url: str | None = None
    posted_blockers: frozenset[Blocker] = frozenset()  # reported by a Warning Event already
    last_drift_check: float = 0.0  # monotonic time of the monitor's last comparison of children and spec
    reported_failures: tuple[str, ...] = ()  # worker failures reported by a Warning Event already
    gone: bool = False  # the watch reported the job deleted: its monitor ends (handlers.py, no finalizer)
    # One for the whole operator: kopf copies the operator-wide memo shallowly.
    metrics: JobMetrics = field(default_factory=JobMetrics)
    _wakeup: asyncio.Event | None = None
    _lock: asyncio.Lock | None = None

    @property
    def wakeup(self) -> asyncio.Event:
        # Created on first use, after kopf copied the operator-wide memo: one event per job.
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        return self._wakeup

    @property
    def lock(self) -> asyncio.Lock:
        """Held while children are applied: the spec handler and the monitor's drift repair never interleave."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def wake(self) -> None:
        self.wakeup.set()

    def close_store(self) -> None:
        if self.store is not None:
            self.store.client.close()
        self.store = None
        self.store_url = None
