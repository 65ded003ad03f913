"""The engine loop's health: an engine that fails every iteration, or a loop thread that died, is reported,
and no request is left waiting; one good iteration makes it healthy again."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from alchemist_worker.engine.engine_loop import EngineLoop
from alchemist_worker.engine.llm_engine import LLMEngine
from alchemist_worker.engine.sampling_params import SamplingParams
from alchemist_worker.engine.serving_engine import EngineStepFailed, GenerationRequest, RequestOutput

from tests.worker.engine.conftest import build_engine

GREEDY = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


@pytest.fixture
def engine(tiny_checkpoints: dict[str, Path]) -> LLMEngine:
    return build_engine(tiny_checkpoints["llama"])


@pytest.fixture
def loop(engine: LLMEngine) -> Iterator[EngineLoop]:
    loop = EngineLoop(engine, idle_wait_s=0.01, max_failed_iterations=3)
    loop.start()
    yield loop
    loop.stop()


def ask(loop: EngineLoop, request_id: str) -> RequestOutput | BaseException:
    """Submits one request and waits for its last output, or the error it failed with."""
    results: queue.SimpleQueue[RequestOutput | BaseException] = queue.SimpleQueue()
    loop.submit(GenerationRequest(request_id, [5, 6, 7], GREEDY), results.put)
    while True:
        item = results.get(timeout=30)
        if isinstance(item, BaseException) or item.finished:
            return item


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_an_engine_failing_every_iteration_turns_unhealthy_and_recovers(
    loop: EngineLoop, engine: LLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine.runner, "run", broken)
    for i in range(3):
        assert loop.health_problem() is None
        assert isinstance(ask(loop, f"r{i}"), EngineStepFailed)
    problem = loop.health_problem()
    assert problem is not None and "last 3 iterations" in problem and "illegal memory access" in problem
    monkeypatch.undo()
    answer = ask(loop, "after")
    assert isinstance(answer, RequestOutput) and answer.error is None
    assert loop.health_problem() is None and engine.block_manager.num_used_blocks == 0


def test_a_step_that_raises_fails_in_flight_requests_with_a_retriable_error(
    loop: EngineLoop, engine: LLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine.scheduler, "schedule", lambda: (_ for _ in ()).throw(KeyError("lost")))
    assert isinstance(ask(loop, "a"), EngineStepFailed)
    assert loop.consecutive_failed_iterations == 1 and loop.alive


def test_a_dead_loop_is_reported_and_fails_what_waits(loop: EngineLoop, engine: LLMEngine) -> None:
    def explode() -> None:
        if engine.has_unfinished():
            raise RuntimeError("a training slice crashed")

    loop.add_between_iterations(explode)
    stuck = ask(loop, "in-flight")
    assert isinstance(stuck, EngineStepFailed) and "training slice crashed" in str(stuck)
    wait_for(lambda: not loop.alive)
    problem = loop.health_problem()
    assert problem is not None and "loop died" in problem
    late = ask(loop, "late")  # answered at once, not queued forever
    assert isinstance(late, EngineStepFailed) and "not running" in str(late)
