"""The control thread's duties, run so that each fails alone, and the health readiness is judged by.

The control thread does several unrelated things on one loop: holding the trainer lease, consuming feedback,
starting and finishing steps, following the rollout pointer, beating the heartbeat. Before, one exception ended
the whole tick, so a bad feedback entry that failed every read also stopped version following and the heartbeat
(the replica then fell behind and vanished from the job while /readyz said 200). Now each duty runs on its own:
a failure is logged, counted (`alchemist_control_duty_failures_total{duty}`) and backed off, and the other duties
go on.

Readiness (`problem()`, behind /readyz): a duty failing without a success for `stall_s`, or a control loop that
has not finished a tick for `stall_s` (a duty blocked, e.g. waiting on the engine), makes the replica not ready,
with the reason. A duty that is merely idle (feedback while another replica trains) is healthy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger(__name__)

REDIS_BACKOFF_S = (0.1, 2.0)  # first and longest wait after a Redis error (doubling)
ERROR_BACKOFF_S = 1.0  # wait after any other failure


@dataclass
class DutyState:
    failures: int = 0
    consecutive: int = 0
    failing_since: float | None = None  # first failure since the last success
    last_success: float | None = None
    last_error: str = ""
    retry_at: float = 0.0


class ControlDuties:
    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        stall_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if stall_s <= 0:
            raise ValueError(f"stall_s must be positive, got {stall_s}")
        self.stall_s = stall_s
        self.clock = clock
        self.states: dict[str, DutyState] = {}
        self._lock = threading.Lock()  # HTTP threads read while the control thread writes
        self._running: tuple[str, float] | None = None
        self._first_run: float | None = None  # the loop's clock starts with its first duty
        self._last_tick: float | None = None
        r = registry or CollectorRegistry()
        self.failures = Counter(
            "alchemist_control_duty_failures",
            "Failures of a control-loop duty (each is retried alone; the other duties go on)",
            ["duty"],
            registry=r,
        )
        self.failing = Gauge(
            "alchemist_control_duty_failing_seconds",
            "How long a control-loop duty has been failing without a success (0: healthy)",
            ["duty"],
            registry=r,
        )

    def run(self, name: str, duty: Callable[[], object]) -> BaseException | None:
        """Runs `duty` unless it is backing off after a failure; returns the exception it raised, if any."""
        now = self.clock()
        with self._lock:
            state = self.states.setdefault(name, DutyState())
            if now < state.retry_at:
                return None
            self._running = (name, now)
            if self._first_run is None:
                self._first_run = now
        try:
            duty()
        except Exception as exc:  # never let one duty take the others down
            self._failed(name, state, exc)
            return exc
        finally:
            with self._lock:
                self._running = None
        with self._lock:
            state.consecutive = 0
            state.failing_since = None
            state.last_success = self.clock()
        self.failing.labels(duty=name).set(0)
        return None

    def _failed(self, name: str, state: DutyState, exc: Exception) -> None:
        now = self.clock()
        with self._lock:
            state.failures += 1
            state.consecutive += 1
            if state.failing_since is None:
                state.failing_since = now
            state.last_error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, redis.RedisError):
                first, longest = REDIS_BACKOFF_S
                wait = min(longest, first * 2 ** (state.consecutive - 1))
            else:
                wait = ERROR_BACKOFF_S
            state.retry_at = now + wait
            failing_for = now - state.failing_since
        self.failures.labels(duty=name).inc()
        self.failing.labels(duty=name).set(failing_for)
        if isinstance(exc, redis.RedisError):
            log.warning("control duty %s: Redis unavailable (%s); retrying in %.1fs", name, exc, wait)
        else:
            log.error("control duty %s failed (retrying in %.1fs)", name, wait, exc_info=exc)

    def tick_done(self) -> None:
        """The control loop finished one pass over its duties."""
        with self._lock:
            self._last_tick = self.clock()

    def problem(self) -> str | None:
        """Why the control loop is unhealthy, or None. Safe to call from any thread."""
        now = self.clock()
        with self._lock:
            running = self._running
            reference = self._last_tick if self._last_tick is not None else self._first_run
            failing = {
                name: (now - s.failing_since, s.last_error)
                for name, s in self.states.items()
                if s.failing_since is not None
            }
        problems = [
            f"control duty {name} failing for {age:.0f}s: {error}"
            for name, (age, error) in sorted(failing.items())
            if age >= self.stall_s
        ]
        since_tick = 0.0 if reference is None else now - reference
        if since_tick >= self.stall_s:
            where = f" (in duty {running[0]} for {now - running[1]:.0f}s)" if running else ""
            problems.append(f"control loop has not completed a pass for {since_tick:.0f}s{where}")
        return "; ".join(problems) or None

    def snapshot(self) -> dict[str, dict[str, object]]:
        """Per duty: failures, consecutive failures, seconds since the last success, the last error."""
        now = self.clock()
        with self._lock:
            return {
                name: {
                    "failures": s.failures,
                    "consecutive_failures": s.consecutive,
                    "since_success_s": None if s.last_success is None else round(now - s.last_success, 3),
                    "last_error": s.last_error,
                }
                for name, s in sorted(self.states.items())
            }
