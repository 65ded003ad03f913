"""A training step as a resumable cursor, advanced in time-bounded slices between engine iterations.

The step itself is ordinary code (forward, backward, optimizer) written by the training package, without any
notion of slicing. The cursor runs it on a dedicated thread and makes that thread stop at *yield points*: it
pauses there once the slice's deadline has passed and waits for the next slice. The thread that calls
`advance()` (the engine loop's) blocks while the step runs, so serving and training never compute at the same
time on the CPU, and each slice ends within one yield point's worth of work after its deadline.

Yield points come from three places, so no training code has to know about them:
- autograd's saved-tensor hooks: every tensor saved in forward (pack) and used in backward (unpack), i.e. a few
  per layer in both directions, whatever the step's implementation (per-layer manual backward included);
- forward pre-hooks on the model's decoder blocks (`yield_at_modules`), for work autograd does not see;
- explicit `cursor_yield()` calls, e.g. between micro-batches.

On a GPU the step's kernels go to its own CUDA stream; a pause synchronizes that stream, so a slice's time is
its device time and serving's next iteration starts on an idle device. On CPU the same code runs synchronously.
`cancel()` makes the step raise `StepCancelled` at its next yield point (a rollback, or shutdown).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import Any, Generic, TypeVar

import torch
from torch import nn

T = TypeVar("T")

_local = threading.local()


class StepCancelled(Exception):
    """Raised inside a step at a yield point after `StepCursor.cancel()`."""


def cursor_yield() -> None:
    """A yield point: pauses the running step here if its slice is over. A no-op outside a cursor."""
    cursor = getattr(_local, "cursor", None)
    if cursor is not None:
        cursor._yield_point()


class StepCursor(Generic[T]):
    """Runs `step()` in slices. `advance(budget_s)` returns True once the step has finished (or failed)."""

    def __init__(
        self,
        step: Callable[[], T],
        *,
        yield_at_modules: Iterable[nn.Module] = (),
        on_resume: Callable[[], None] | None = None,
        on_pause: Callable[[], None] | None = None,
        device: torch.device | None = None,
        name: str = "training-step",
    ) -> None:
        """`on_resume`/`on_pause` run on the advancing thread around each slice (e.g. swap in the training
        weights, then the serving ones back)."""
        self._step = step
        self._modules = list(yield_at_modules)
        self._on_resume = on_resume
        self._on_pause = on_pause
        self._device = device if device is not None and device.type == "cuda" else None
        self._stream = torch.cuda.Stream(self._device) if self._device is not None else None
        self._name = name
        self._go = threading.Event()
        self._paused = threading.Event()
        self._deadline = 0.0
        self._cancelled = False
        self._thread: threading.Thread | None = None
        self._result: T | None = None
        self._error: BaseException | None = None
        self.done = False
        self.slices = 0
        self.busy_s = 0.0  # time spent inside slices
        self.yield_points = 0

    # Advancing thread.
    def advance(self, budget_s: float) -> bool:
        """Runs the step for about `budget_s` seconds (at least to its next yield point); True when done."""
        if self.done:
            return True
        if budget_s <= 0:
            return False
        started = time.perf_counter()
        self._deadline = started + budget_s
        if self._on_resume is not None:
            self._on_resume()
        try:
            self._paused.clear()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            else:
                self._go.set()
            self._paused.wait()
        finally:
            if self._on_pause is not None:
                self._on_pause()
            self.slices += 1
            self.busy_s += time.perf_counter() - started
        return self.done

    def run_to_end(self) -> T:
        """Runs the whole step now (tests, shutdown, benchmarks of the unsliced step)."""
        while not self.advance(3600.0):
            pass
        return self.result()

    def result(self) -> T:
        if not self.done:
            raise RuntimeError("the step has not finished yet")
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    @property
    def failed(self) -> bool:
        return self.done and self._error is not None

    def cancel(self) -> None:
        """Stops the step: it raises StepCancelled at its next yield point, which this call lets it reach."""
        self._cancelled = True
        if self._thread is None:
            self._error = StepCancelled("cancelled before it started")
            self.done = True
            return
        while not self.done:
            self.advance(3600.0)

    # Step thread.
    def _run(self) -> None:
        _local.cursor = self
        try:
            with ExitStack() as stack:
                stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack))
                for module in self._modules:
                    handle = module.register_forward_pre_hook(self._module_hook)
                    stack.callback(handle.remove)
                if self._stream is not None:
                    stack.enter_context(torch.cuda.stream(self._stream))
                if self._cancelled:
                    raise StepCancelled("cancelled before it started")
                self._result = self._step()
                self._sync()
        except BaseException as exc:  # handed to the advancing thread through result()
            self._error = exc
        finally:
            _local.cursor = None
            self.done = True
            self._paused.set()

    def _pack(self, tensor: torch.Tensor) -> Any:
        self._yield_point()
        return tensor

    def _unpack(self, tensor: Any) -> torch.Tensor:
        self._yield_point()
        return tensor

    def _module_hook(self, _module: nn.Module, _args: Any) -> None:
        # Module hooks fire on every thread (serving calls the same modules); only the step's thread yields.
        if getattr(_local, "cursor", None) is self:
            self._yield_point()

    def _sync(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

    def _yield_point(self) -> None:
        self.yield_points += 1
        if self._cancelled:
            raise StepCancelled("the training step was cancelled")
        if time.perf_counter() < self._deadline:
            return
        self._sync()
        self._go.clear()
        self._paused.set()
        self._go.wait()
        if self._cancelled:
            raise StepCancelled("the training step was cancelled")
