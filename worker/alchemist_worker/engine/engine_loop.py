"""The thread that owns a `ServingEngine` and drives it: one iteration after another, then hooks in between.

Every engine call happens on this thread, so the engine needs no locks. Other threads (the HTTP server's event
loop) talk to it through `submit` and `abort`, which only enqueue commands; outputs go back through each
request's sink callback, called on this thread (the caller makes it thread-safe, e.g. call_soon_threadsafe).

`between_iterations` callbacks run after each iteration and while idle: that is where the runtime will run
bounded training slices, so serving never waits on training for more than one slice.

Health. A failure that the engine pins on some requests fails only those. An iteration that fails as a whole
(`step()` raised, or every request in it failed with `EngineStepFailed`) fails its requests with a retriable
`EngineStepFailed`; after `max_failed_iterations` of those in a row, with no token produced in between,
`health_problem()` says the engine is broken, and /healthz and /readyz turn 503 so that the pod is restarted
and gets no traffic meanwhile. One iteration that produces a token clears it. A loop thread that died is
reported too, and whatever was in flight or queued fails instead of waiting forever.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from alchemist_worker.engine.serving_engine import (
    EngineStats,
    EngineStepFailed,
    GenerationRequest,
    RequestOutput,
    ServingEngine,
)

log = logging.getLogger(__name__)

OutputSink = Callable[[RequestOutput | BaseException], None]
MAX_FAILED_ITERATIONS = 3  # whole-iteration failures in a row that make the engine unhealthy
StepObserver = Callable[[list[RequestOutput], float], None]


@dataclass
class _Submit:
    request: GenerationRequest
    sink: OutputSink


@dataclass
class _Abort:
    request_id: str | None  # None: every request in flight


class EngineLoop:
    def __init__(
        self,
        engine: ServingEngine,
        idle_wait_s: float = 0.05,
        max_failed_iterations: int = MAX_FAILED_ITERATIONS,
    ) -> None:
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self.max_failed_iterations = max_failed_iterations
        self._commands: queue.SimpleQueue[_Submit | _Abort] = queue.SimpleQueue()
        self._sinks: dict[str, OutputSink] = {}
        self._step_observers: list[StepObserver] = []
        self._between_iterations: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats: EngineStats = (
            engine.stats()
        )  # refreshed after every iteration (the co-scheduler reads it)
        self.iterations = 0
        self.failed_iterations = 0
        self.consecutive_failed_iterations = 0
        self.last_failure: str | None = None
        self._death: str | None = None
        # Guards `_closed`, so that nothing is submitted after the loop thread failed what was queued.
        self._submit_lock = threading.Lock()
        self._closed = False

    # Wiring (before start) -------------------------------------------------------------------------------

    def add_step_observer(self, observer: StepObserver) -> None:
        """Called on the loop thread with each iteration's outputs and its duration in seconds."""
        self._step_observers.append(observer)

    def add_between_iterations(self, callback: Callable[[], None]) -> None:
        self._between_iterations.append(callback)

    # Thread-safe API ---------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: OutputSink) -> None:
        with self._submit_lock:
            if not self._closed:
                self._commands.put(_Submit(request, sink))
                return
        sink(EngineStepFailed(f"the engine is not running ({self._death or 'stopped'}); retry elsewhere"))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def abort_all(self) -> None:
        """Cancels every request in flight (e.g. when a shutdown deadline has passed)."""
        self._commands.put(_Abort(None))

    @property
    def num_in_flight(self) -> int:
        """Requests submitted and not yet finished (including those still in the command queue)."""
        return len(self._sinks) + self._commands.qsize()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def health_problem(self) -> str | None:
        """Why this engine cannot serve (its loop is not running, or it fails every iteration), or None."""
        if not self.alive:
            return self._death or "the engine loop is not running"
        if self.consecutive_failed_iterations >= self.max_failed_iterations:
            return (
                f"the engine failed its last {self.consecutive_failed_iterations} iterations; "
                f"last error: {self.last_failure}"
            )
        return None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine loop is already started")
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # Loop thread -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                busy = self.engine.has_unfinished()
                self._drain_commands(block=not busy)
                if self.engine.has_unfinished():
                    self._iterate()
                for callback in self._between_iterations:
                    callback()
        except Exception as exc:  # logged and reported by health_problem(); the thread ends here
            self._death = f"the engine loop died: {type(exc).__name__}: {exc}"
            log.exception("the engine loop died")
        finally:
            self._fail_everything()

    def _fail_everything(self) -> None:
        """Fails what is in flight and what is still queued; later submits fail at once."""
        with self._submit_lock:
            self._closed = True
        reason = self._death or "the engine stopped"
        for request_id, sink in list(self._sinks.items()):
            sink(EngineStepFailed(f"{reason} before request {request_id} finished"))
        self._sinks.clear()
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Submit):
                command.sink(EngineStepFailed(f"{reason}; retry the request"))

    def _count_failure(self, exc: BaseException) -> None:
        self.failed_iterations += 1
        self.consecutive_failed_iterations += 1
        self.last_failure = f"{type(exc).__name__}: {exc}"

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=self.idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._execute(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _execute(self, command: _Submit | _Abort) -> None:
        if isinstance(command, _Submit):
            rid = command.request.request_id
            if rid in self._sinks:
                command.sink(ValueError(f"request id {rid} is already in flight"))
                return
            try:
                self.engine.add_request(command.request)
            except ValueError as exc:
                command.sink(exc)
                return
            self._sinks[rid] = command.sink
        elif command.request_id is None:
            for request_id in list(self._sinks):
                self.engine.abort(request_id)
        elif command.request_id in self._sinks:
            self.engine.abort(command.request_id)

    def _iterate(self) -> None:
        started = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as exc:  # the iteration could not run at all: fail what is in flight, not the server
            log.exception("engine iteration failed; failing %d in-flight requests", len(self._sinks))
            self._count_failure(exc)
            error = EngineStepFailed(f"the engine failed an iteration ({type(exc).__name__}: {exc}); retry")
            error.__cause__ = exc
            for request_id, failed_sink in list(self._sinks.items()):
                self.engine.abort(request_id)
                failed_sink(error)
            self._sinks.clear()
            try:
                self.engine.step()  # reports the aborts; nothing is left to compute
            except Exception:
                log.exception("the engine could not clean up after a failed iteration")
            return
        elapsed = time.perf_counter() - started
        self.iterations += 1
        if any(out.error is None and out.new_token_ids for out in outputs):
            self.consecutive_failed_iterations = 0
        else:
            stalled = next((o.error for o in outputs if isinstance(o.error, EngineStepFailed)), None)
            if stalled is not None:
                self._count_failure(stalled)
        for out in outputs:
            sink: OutputSink | None = (
                self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
            )
            if sink is not None:
                sink(out if out.error is None else out.error)
        self.stats = self.engine.stats()
        for observer in self._step_observers:
            observer(outputs, elapsed)
