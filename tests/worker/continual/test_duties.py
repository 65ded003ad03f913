"""ControlDuties on a fake clock: failures isolated, counted and backed off; readiness from stalls."""

from __future__ import annotations

import pytest
import redis
from alchemist_worker.continual.duties import ControlDuties
from prometheus_client import CollectorRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def boom() -> None:
    raise RuntimeError("poisoned")


def failures(registry: CollectorRegistry, duty: str) -> float:
    value = registry.get_sample_value("alchemist_control_duty_failures_total", {"duty": duty})
    return value or 0.0


def test_a_failing_duty_is_counted_and_backed_off_and_the_others_run() -> None:
    clock, registry = Clock(), CollectorRegistry()
    duties = ControlDuties(registry, stall_s=30, clock=clock)
    ran: list[str] = []
    assert isinstance(duties.run("feedback", boom), RuntimeError)
    assert duties.run("heartbeat", lambda: ran.append("heartbeat")) is None
    assert duties.run("feedback", boom) is None  # backing off: not run again at once
    clock.now += 1.0
    assert isinstance(duties.run("feedback", boom), RuntimeError)
    assert (
        ran == ["heartbeat"] and failures(registry, "feedback") == 2 and failures(registry, "heartbeat") == 0
    )
    snapshot = duties.snapshot()
    assert snapshot["feedback"]["consecutive_failures"] == 2 and "poisoned" in str(snapshot["feedback"])


def test_redis_errors_back_off_exponentially_up_to_a_bound() -> None:
    clock = Clock()
    duties = ControlDuties(stall_s=30, clock=clock)
    waits = []
    for _ in range(7):
        duties.run("lease", lambda: (_ for _ in ()).throw(redis.ConnectionError("down")))
        waits.append(round(duties.states["lease"].retry_at - clock.now, 3))
        clock.now = duties.states["lease"].retry_at
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]


def test_readiness_fails_once_a_duty_has_failed_without_success_for_the_stall_time() -> None:
    clock = Clock()
    duties = ControlDuties(stall_s=30, clock=clock)
    duties.run("feedback", boom)
    duties.tick_done()
    clock.now += 29
    duties.tick_done()
    assert duties.problem() is None  # a passing failure is not a reason to take traffic away
    clock.now += 2
    duties.run("feedback", boom)
    duties.tick_done()
    problem = duties.problem()
    assert problem is not None and "feedback failing for 31s" in problem and "poisoned" in problem
    clock.now += 1  # after the back-off
    duties.run("feedback", lambda: None)
    assert duties.problem() is None  # one success clears it


def test_readiness_fails_when_the_loop_stops_completing_passes_and_names_the_duty_it_is_in() -> None:
    clock = Clock()
    duties = ControlDuties(stall_s=30, clock=clock)
    assert duties.problem() is None  # not started yet: nothing to judge

    def blocked() -> None:  # a duty that does not come back (e.g. waiting on the engine)
        clock.now += 45
        assert duties.problem() == "control loop has not completed a pass for 45s (in duty follow for 45s)"

    duties.run("follow", blocked)
    duties.tick_done()
    assert duties.problem() is None


def test_stall_time_must_be_positive() -> None:
    with pytest.raises(ValueError, match="stall_s"):
        ControlDuties(stall_s=0)
