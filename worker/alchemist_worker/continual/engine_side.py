"""What the continual trainer does on the engine loop's thread, between two iterations.

The engine loop calls `between_iterations()` after every iteration and, while idle, after each short wait.
It does, in order:
1. tasks other threads queued for this thread (start a step, prepare and request a weight switch, restore the
   trainer after a rollback, score a text): the model and the activation store are only touched from here;
2. a pending weight switch on an idle engine (the engine applies switches inside `step()`, which the loop only
   calls when there is work; a replica without traffic must still move to the version it is told to serve);
3. training: while a step is in progress, one slice whose length the co-scheduler sets from serving's load.
   While idle it keeps slicing until a request arrives or the idle budget is spent, so an arrival waits for at
   most one short slice.
When a step finishes, its result (and, when a version is due, a snapshot of the weights and the trainer's
state, taken before any later step can change them) goes back to the control thread through `on_step_done`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from alchemist_worker.continual.co_scheduler import CoScheduler, ServingLoad
from alchemist_worker.continual.trainer import ContinualTrainer, StepResult
from alchemist_worker.engine.engine_loop import EngineLoop
from alchemist_worker.engine.serving_engine import RequestOutput

log = logging.getLogger(__name__)
T = TypeVar("T")
IDLE_WAIT_S = 0.002


@dataclass
class StepDone:
    step_id: int  # which step (the control thread ignores results of steps it abandoned)
    result: StepResult | None  # None when the step failed
    error: BaseException | None
    snapshot: dict[str, torch.Tensor] | None  # weights after the step, when a version is due
    state: dict[str, Any] | None  # the trainer's state_dict with them


class EngineSide:
    def __init__(
        self,
        loop: EngineLoop,
        trainer: ContinualTrainer,
        co_scheduler: CoScheduler,
        on_step_done: Callable[[StepDone], None],
        on_slice: Callable[[float], None] | None = None,
        on_yield: Callable[[], None] | None = None,
    ) -> None:
        self.loop = loop
        self.engine: Any = loop.engine
        self.trainer = trainer
        self.co_scheduler = co_scheduler
        self.on_step_done = on_step_done
        self.on_slice = on_slice
        self.on_yield = on_yield
        self.snapshot_due = False  # set with each step: whether it completes a version
        self.step_id = 0  # the step in progress
        self._tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._last_iteration: tuple[bool, float] | None = None
        self._previous_slice_s = 0.0
        self._last_step_end = 0.0
        self._slow_wait_s = loop.idle_wait_s
        self.enabled = True
        # Where training time went: slices between serving iterations vs while nothing was served.
        self.busy_slices = 0
        self.busy_slice_s = 0.0
        self.max_busy_slice_s = 0.0
        self.idle_slice_s = 0.0

    # Wiring.
    def attach(self) -> None:
        self.loop.add_step_observer(self._observe_step)
        self.loop.add_between_iterations(self.between_iterations)
        self._slow_wait_s = self.loop.idle_wait_s

    def begin_step(self, step_id: int, samples: list[Any], snapshot_due: bool) -> None:
        """Engine thread: starts a step; its StepDone will carry `step_id`."""
        self.step_id = step_id
        self.snapshot_due = snapshot_due
        self.trainer.begin(samples, evaluate=snapshot_due)

    def begin_evaluation(self, step_id: int) -> None:
        """Engine thread: starts scoring the training weights on the evaluation set (trainer.begin_evaluation);
        its StepDone carries `step_id`."""
        self.step_id = step_id
        self.snapshot_due = False
        self.trainer.begin_evaluation()

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Runs `fn` on the engine thread between iterations; the future holds its result."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def task() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self._tasks.put(task)
        return future

    # Engine thread.
    def _observe_step(self, outputs: list[RequestOutput], elapsed_s: float) -> None:
        first_tokens = any(o.num_output_tokens <= 1 and o.new_token_ids for o in outputs)
        self._last_iteration = (not first_tokens, elapsed_s)
        if first_tokens:  # what training adds to a TTFT: the slice that ran before this prefill
            self.co_scheduler.observe_ttft(elapsed_s + self._previous_slice_s)

    def _load(self) -> ServingLoad:
        stats = self.loop.stats
        arrivals = self.loop.num_in_flight > stats.num_running + stats.num_waiting
        after_prefill = self._last_iteration is not None and not self._last_iteration[0]
        return ServingLoad(
            waiting=stats.num_waiting,
            running=stats.num_running,
            arrivals_pending=arrivals,
            after_prefill=after_prefill,
        )

    def between_iterations(self) -> None:
        # An idle loop waits `idle_wait_s` for commands before calling us again (arrivals wake it at once):
        # short while training has work, so neither slices nor the next step wait for nothing.
        active = self.trainer.busy or time.monotonic() - self._last_step_end < 0.5
        self.loop.idle_wait_s = IDLE_WAIT_S if active else self._slow_wait_s
        self._run_tasks()
        if self.engine.switch_pending and not self._engine_busy():
            self.engine.step()  # applies the switch; nothing else is scheduled
        sliced = 0.0
        if self.enabled and self.trainer.busy:
            sliced = self._train()
        if self._last_iteration is not None:
            decode, elapsed = self._last_iteration
            self.co_scheduler.observe_iteration(decode, elapsed, sliced)
            self._last_iteration = None
        self._previous_slice_s = sliced

    def _engine_busy(self) -> bool:
        """Requests in flight (a pending switch alone is not work that needs `step()` to wait for)."""
        stats = self.engine.stats()
        return stats.num_running + stats.num_waiting > 0

    def _run_tasks(self) -> None:
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                return
            task()

    def _train(self) -> float:
        started = time.perf_counter()
        load = self._load()
        budget = self.co_scheduler.slice_budget(load)
        if budget <= 0:
            if self.on_yield is not None:
                self.on_yield()
            return 0.0
        idle = load.idle
        slice_s = min(budget, self.co_scheduler.settings.slice_ms / 1000.0)
        deadline = started + budget
        while True:
            self._advance(slice_s)
            now = time.perf_counter()
            if not self.trainer.busy or not idle or now >= deadline or self.loop.num_in_flight > 0:
                break
            self._run_tasks()
        spent = time.perf_counter() - started
        if idle:
            self.idle_slice_s += spent
        else:
            self.busy_slices += 1
            self.busy_slice_s += spent
            self.max_busy_slice_s = max(self.max_busy_slice_s, spent)
        if self.on_slice is not None:
            self.on_slice(spent)
        return spent

    def _advance(self, slice_s: float) -> None:
        try:
            result = self.trainer.advance(slice_s)
        except Exception as exc:  # a failed step must not stop serving: report it, its feedback stays pending
            log.exception("training step failed")
            self._last_step_end = time.monotonic()
            self.on_step_done(StepDone(self.step_id, None, exc, None, None))
            return
        if result is None:
            return
        self._last_step_end = time.monotonic()
        snapshot = state = None
        if self.snapshot_due:
            snapshot = self.trainer.weights.snapshot()
            state = self.trainer.state_dict()
        self.on_step_done(StepDone(self.step_id, result, None, snapshot, state))
