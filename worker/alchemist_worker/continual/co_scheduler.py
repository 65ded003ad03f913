"""How much time training may take between two engine iterations: serving first, training gets the rest.

The runtime asks `slice_budget(load)` after every engine iteration (and while idle) and runs the training step
until the budget is spent or serving needs the device back. The rules, in order:
- requests waiting beyond `max_queue_depth`: no training at all (serving is behind);
- nothing running or waiting: idle slices of `slice_ms`, repeated until something arrives;
- a request waiting for its prefill, or one just prefilled: no training (the slice would add to a TTFT, or to
  the longest inter-token gaps, the ones that make a p99);
- otherwise, while decoding: a token bucket. Each decode iteration earns `busy_share` of its duration (8% by
  default: the target is p99 inter-token latency within 1.10x); a slice spends what it actually took. A slice
  runs only with credit, for at most that credit and `slice_ms`. A step's operators are not divisible, so a
  slice may overrun its budget by one of them; the bucket then skips the next iterations until the overrun is
  paid back, which keeps training's share of decode time at `busy_share` whatever the operator sizes.
- the busy budget is scaled by an additive-increase / multiplicative-decrease factor driven by measured p99
  TTFT and inter-token latency against their configured bounds (halved when a p99 nears its bound, grown slowly
  while well below it; each decision is made on a fresh window of latencies measured under the previous one).
Pure bookkeeping: imports no torch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from alchemist_worker.continual.settings import TrainerSettings


@dataclass(frozen=True)
class ServingLoad:
    """Serving's state as the runtime sees it between two iterations."""

    waiting: int  # requests admitted by the API but not yet prefilled
    running: int  # requests in the decode batch
    arrivals_pending: bool = False  # something arrived since the last iteration (not yet in the engine)
    after_prefill: bool = False  # the iteration that just ran was a prefill

    @property
    def idle(self) -> bool:
        return self.waiting == 0 and self.running == 0 and not self.arrivals_pending


def p99(samples: deque[float] | list[float]) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


class CoScheduler:
    def __init__(self, settings: TrainerSettings, busy_share: float = 0.08, window: int = 256) -> None:
        if not 0.0 < busy_share <= 1.0:
            raise ValueError(f"busy_share must be in (0, 1], got {busy_share}")
        self.settings = settings
        self.busy_share = busy_share
        self.factor = 1.0  # AIMD multiplier on the busy budget, in [min_factor, 1]
        self.min_factor = 0.05
        self.decode_s: deque[float] = deque(maxlen=window)  # durations of decode iterations
        self.itl_s: deque[float] = deque(maxlen=window)  # decode iteration + the training slice after it
        self.ttft_s: deque[float] = deque(maxlen=window)
        self.credit_s = 0.0  # the token bucket of busy slices, in seconds
        self.yielded = 0
        self.slices = 0
        self._min_samples = max(8, window // 4)  # fresh latency samples needed before each AIMD decision

    # Observations.
    def observe_iteration(self, decode: bool, seconds: float, slice_after_s: float) -> None:
        """One engine iteration and how long the training slice that followed it ran."""
        if decode:
            self.decode_s.append(seconds)
            self.itl_s.append(seconds + slice_after_s)
            cap = self.settings.slice_ms / 1000.0
            self.credit_s = min(cap, self.credit_s + self.busy_share * seconds)
        self.credit_s -= slice_after_s
        self._adapt()

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_s.append(seconds)

    # Decision.
    def slice_budget(self, load: ServingLoad) -> float:
        """Seconds training may run now; 0 means yield."""
        s = self.settings
        if load.waiting >= max(1, s.max_queue_depth):
            self.yielded += 1
            return 0.0
        if load.idle:
            self.slices += 1
            return s.idle_slice_ms / 1000.0
        if load.waiting or load.arrivals_pending or load.after_prefill or self.credit_s <= 0:
            self.yielded += 1
            return 0.0
        self.slices += 1
        return min(s.slice_ms / 1000.0, self.credit_s) * self.factor

    def _adapt(self) -> None:
        s = self.settings
        if max(len(self.itl_s), len(self.ttft_s)) < self._min_samples:
            return
        ratios = []
        if s.itl_p99_bound_ms > 0 and (itl := p99(self.itl_s)) is not None:
            ratios.append(itl * 1000.0 / s.itl_p99_bound_ms)
        if s.ttft_p99_bound_ms > 0 and (ttft := p99(self.ttft_s)) is not None:
            ratios.append(ttft * 1000.0 / s.ttft_p99_bound_ms)
        if not ratios:
            return
        worst = max(ratios)
        if worst > 0.9:
            self.factor = max(self.min_factor, self.factor * 0.5)
        elif worst < 0.7:
            self.factor = min(1.0, self.factor + 0.05)
        else:
            return
        # Judge the new factor on latencies measured under it only.
        self.itl_s.clear()
        self.ttft_s.clear()
