"""Prometheus metrics of the continual trainer, in the registry the worker's /metrics already serves.

Training tokens/s, loss, step time, samples reused vs recomputed by reason, staleness of reused records,
feedback lag (entries and seconds), dead letters, and the versions served and trained.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
SLICE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1)
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32)
THROUGHPUT_WINDOW_S = 30.0


class TrainingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.tokens = Counter("alchemist_training_tokens", "Prompt+response tokens trained on", registry=r)
        self.tokens_per_s = Gauge(
            "alchemist_training_tokens_per_second",
            f"Training tokens per second of wall time over the last {THROUGHPUT_WINDOW_S:.0f}s",
            registry=r,
        )
        self.loss = Gauge("alchemist_training_loss", "Mean response-token loss of the last step", registry=r)
        self.learning_rate = Gauge(
            "alchemist_training_learning_rate",
            "Learning rate of the last step (schedule, and the gate's backoff after held versions, applied)",
            registry=r,
        )
        self.step_seconds = Histogram(
            "alchemist_training_step_seconds",
            "Wall time of a training step, first slice to commit (sliced between engine iterations)",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.step_busy_seconds = Histogram(
            "alchemist_training_step_busy_seconds",
            "Time a training step actually computed (the sum of its slices)",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.steps = Counter(
            "alchemist_training_steps",
            "Training steps in committed versions (counted at the commit)",
            registry=r,
        )
        self.samples = Counter(
            "alchemist_training_samples",
            "Trained samples by path (reused a record or recomputed) and reason",
            ["path", "reason"],
            registry=r,
        )
        self.staleness = Histogram(
            "alchemist_training_staleness_versions",
            "Versions between a sample's prefill and the weights it trained",
            buckets=STALENESS_BUCKETS,
            registry=r,
        )
        self.slice_seconds = Histogram(
            "alchemist_training_slice_seconds",
            "Duration of one training slice between engine iterations",
            buckets=SLICE_BUCKETS,
            registry=r,
        )
        self.yields = Counter(
            "alchemist_training_yields", "Times training gave its turn to serving entirely", registry=r
        )
        self.feedback = Counter(
            "alchemist_feedback_consumed", "Feedback entries consumed, by label", ["label"], registry=r
        )
        self.dead_letters = Counter(
            "alchemist_feedback_dead_letters", "Feedback entries sent to the dead-letter stream", registry=r
        )
        self.duplicates = Counter(
            "alchemist_feedback_duplicates", "Redelivered or repeated feedback ids skipped", registry=r
        )
        self.lag_entries = Gauge(
            "alchemist_feedback_lag_entries",
            "Feedback entries not yet acknowledged (undelivered + pending)",
            registry=r,
        )
        self.lag_seconds = Gauge(
            "alchemist_feedback_lag_seconds", "Age of the oldest unacknowledged feedback entry", registry=r
        )
        self.held = Gauge(
            "alchemist_feedback_held", "Feedback entries read and awaiting their step", registry=r
        )
        self.version = Gauge(
            "alchemist_model_version",
            "Model version, by role (serving or training head)",
            ["role"],
            registry=r,
        )
        self.versions_published = Counter(
            "alchemist_versions_published", "Versions this replica published", registry=r
        )
        self.commit_failures = Counter(
            "alchemist_version_commit_failures",
            "Failed version commits by class: conflict (lease taken over or head moved; training restarts), "
            "io (the versions directory refused a write) or redis (unavailable); io and redis are retried",
            ["class"],
            registry=r,
        )
        self.trainer_lease = Gauge(
            "alchemist_trainer_lease_held", "1 when this replica holds the job's trainer lease", registry=r
        )
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def step_finished(
        self,
        *,
        tokens: int,
        loss: float,
        lr: float,
        wall_s: float,
        busy_s: float,
        outcomes: Iterable[tuple[str, str]],
        staleness: Iterable[int],
    ) -> None:
        """`outcomes`: (path, reason) per sample, path "reused" or "recomputed". Not yet committed: see `steps`."""
        now = time.monotonic()
        self.tokens.inc(tokens)
        self.loss.set(loss)
        self.learning_rate.set(lr)
        self.step_seconds.observe(wall_s)
        self.step_busy_seconds.observe(busy_s)
        for path, reason in outcomes:
            self.samples.labels(path=path, reason=reason).inc()
        for versions in staleness:
            self.staleness.observe(versions)
        self._recent.append((now, tokens))
        self.refresh_throughput(now)

    def refresh_throughput(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        while self._recent and now - self._recent[0][0] > THROUGHPUT_WINDOW_S:
            self._recent.popleft()
        if not self._recent:
            self.tokens_per_s.set(0.0)
            return
        span = max(now - self._recent[0][0], 1.0)
        self.tokens_per_s.set(sum(t for _, t in self._recent) / span)
