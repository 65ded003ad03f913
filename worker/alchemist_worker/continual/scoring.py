"""Scoring (`POST /v1/score`) as interruptible engine work: a long score never stalls serving.

A score is a forward pass of the served model over prompt + continuation. Run in one piece on the engine
thread, a few thousand tokens held every request in flight for as long as it took (80 s on a CPU). Here it
runs in a `StepCursor`, like a training step: on its own thread, stopping at yield points (each decoder
block, and between row chunks of the output projection) once its slice is over. The engine loop gives the
oldest score one slice of `slice_s` after each iteration while requests are being served, and keeps slicing
while nothing is, so serving waits at most one slice (plus one operator) for a score.

Scores run between iterations, with the serving weights installed (a training slice puts them back when it
pauses). A version switch between two slices would mix versions within one score, so the score checks the
version at its end and starts again if it changed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from alchemist_worker.continual.step_cursor import StepCursor, cursor_yield
from alchemist_worker.engine.engine_loop import EngineLoop
from alchemist_worker.model.attention import DenseCausalAttention
from alchemist_worker.training.batch import TrainingSample, full_batch

LOGIT_ROWS = 256  # rows of the output projection computed between two yield points


class ScoreQueueFull(Exception):
    """Too many scores are waiting; the client should retry later."""


def continuation_logprob(
    model: Any, device: torch.device, prompt: list[int], continuation: list[int]
) -> float:
    """Summed log-probability of `continuation` after `prompt` (teacher forcing), with yield points between
    chunks of the vocabulary projection, its largest operator (a no-op outside a cursor)."""
    sample = TrainingSample("score", torch.tensor(prompt), torch.tensor(continuation))
    batch = full_batch([sample], device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    with torch.inference_mode():
        backend = DenseCausalAttention(batch.cu_seqlens, sliding_window=model.config.sliding_window)
        hidden = model(batch.input_ids, batch.positions, backend)[batch.loss_rows]  # [R, hidden]
        for rows, labels in zip(hidden.split(LOGIT_ROWS), batch.labels.split(LOGIT_ROWS), strict=True):
            cursor_yield()
            logits = model.compute_logits(rows).float()  # [r, vocab]
            total += torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).sum()
    return float(total)


@dataclass
class _Job:
    work: Callable[[], Any]
    future: concurrent.futures.Future[Any]
    cursor: StepCursor[Any] | None = None


class ScoreQueue:
    """Runs scores in slices between engine iterations, oldest first; `submit` is thread-safe."""

    def __init__(
        self,
        loop: EngineLoop,
        *,
        yield_at_modules: Iterable[nn.Module],
        device: torch.device | None = None,
        slice_s: float = 0.02,
        idle_slice_s: float = 0.2,
        max_waiting: int = 16,
    ) -> None:
        if slice_s <= 0 or idle_slice_s <= 0 or max_waiting < 1:
            raise ValueError("score slices must be positive and at least one score must be allowed to wait")
        self.loop = loop
        self.modules = list(yield_at_modules)
        self.device = device
        self.slice_s = slice_s
        self.idle_slice_s = idle_slice_s
        self.max_waiting = max_waiting
        self._inbox: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._jobs: deque[_Job] = deque()  # engine thread only
        self._lock = threading.Lock()
        self._unfinished = 0
        self.slices = 0
        self.longest_slice_s = 0.0

    def attach(self) -> None:
        self.loop.add_between_iterations(self.between_iterations)

    def submit(self, work: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Queues `work` (which must only touch the model); raises ScoreQueueFull beyond `max_waiting`.
        Cancelling the future abandons the work at its next yield point."""
        with self._lock:
            if self._unfinished >= self.max_waiting:
                raise ScoreQueueFull(f"{self._unfinished} scores are waiting (limit {self.max_waiting})")
            self._unfinished += 1
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._inbox.put(_Job(work, future))
        return future

    # Engine thread.
    def between_iterations(self) -> None:
        while True:
            try:
                self._jobs.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        if not self._jobs:
            return
        started = time.perf_counter()
        idle = self.loop.num_in_flight == 0
        deadline = started + (self.idle_slice_s if idle else self.slice_s)
        while self._jobs:
            job = self._jobs[0]
            if job.future.cancelled():
                self._finish(job)
                continue
            if job.cursor is None:
                job.cursor = StepCursor(
                    job.work, yield_at_modules=self.modules, device=self.device, name="score"
                )
            budget = min(self.slice_s, deadline - time.perf_counter())
            slice_started = time.perf_counter()
            done = job.cursor.advance(max(budget, 1e-6))
            self.slices += 1
            self.longest_slice_s = max(self.longest_slice_s, time.perf_counter() - slice_started)
            if done:
                self._finish(job)
            if time.perf_counter() >= deadline or self.loop.num_in_flight > 0:
                return

    def _finish(self, job: _Job) -> None:
        self._jobs.popleft()
        with self._lock:
            self._unfinished -= 1
        cursor = job.cursor
        if cursor is None:
            return
        if not cursor.done:
            cursor.cancel()  # raises StepCancelled inside the work at its next yield point
            return
        error = None
        try:
            result = cursor.result()
        except BaseException as exc:  # handed to whoever waits for the score
            error = exc
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # the waiter cancelled meanwhile
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
