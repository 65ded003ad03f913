"""Prometheus metrics of the serving side, in a registry per server (so tests can run several at once).

Latencies are measured on the engine thread when an iteration hands tokens out: time to first token from the
request's arrival, and inter-token latency as the gap since the request's previous tokens divided by how many
arrived. Gauges (queue depth, batch size, KV blocks, recorded bytes) are read at scrape time from the engine
loop's latest stats snapshot. GPU memory and utilization come from NVML when the machine has it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from alchemist_worker.engine.engine_loop import EngineLoop
from alchemist_worker.engine.serving_engine import RequestOutput
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30, 60)
THROUGHPUT_WINDOW_S = 10.0


class ServingMetrics:
    def __init__(self, loop: EngineLoop, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.loop = loop
        self.ttft = Histogram(
            "alchemist_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "alchemist_inter_token_latency_seconds",
            "Time between two consecutive generated tokens of one request",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "alchemist_request_latency_seconds",
            "Time from a request's arrival to its last token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.iteration = Histogram(
            "alchemist_engine_iteration_seconds",
            "Duration of one engine iteration",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "alchemist_requests",
            "Finished requests by finish reason",
            ["finish_reason"],
            registry=self.registry,
        )
        self.redis_write_failures = Counter(
            "alchemist_request_record_write_failures",
            "Request records that could not be written to Redis",
            registry=self.registry,
        )
        self._arrivals: dict[str, float] = {}
        self._last_token: dict[str, float] = {}
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        self.registry.register(_EngineCollector(self))
        self.registry.register(_GpuCollector())

    def request_arrived(self, request_id: str, arrival_time: float) -> None:
        """arrival_time on the time.monotonic clock."""
        with self._lock:
            self._arrivals[request_id] = arrival_time

    def request_dropped(self, request_id: str) -> None:
        """Forgets a request that never reached the engine (refused, or its client left first)."""
        with self._lock:
            self._arrivals.pop(request_id, None)
            self._last_token.pop(request_id, None)

    def observe_step(self, outputs: list[RequestOutput], elapsed_s: float) -> None:
        now = time.monotonic()
        self.iteration.observe(elapsed_s)
        generated = 0
        with self._lock:
            for out in outputs:
                count = len(out.new_token_ids)
                generated += count
                previous = self._last_token.get(out.request_id)
                arrival = self._arrivals.get(out.request_id)
                if count and previous is None and arrival is not None:
                    self.ttft.observe(now - arrival)
                elif count and previous is not None:
                    gap = (now - previous) / count
                    for _ in range(count):
                        self.itl.observe(gap)
                if count:
                    self._last_token[out.request_id] = now
                if out.finished:
                    self.requests.labels(str(out.finish_reason)).inc()
                    if arrival is not None:
                        self.e2e.observe(now - arrival)
                    self._arrivals.pop(out.request_id, None)
                    self._last_token.pop(out.request_id, None)
            self._recent.append((now, generated))
            while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        with self._lock:
            if not self._recent:
                return 0.0
            span = max(time.monotonic() - self._recent[0][0], 1.0)
            return sum(n for _, n in self._recent) / span


class _EngineCollector(Collector):
    def __init__(self, metrics: ServingMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        stats = self.metrics.loop.stats
        yield _gauge("alchemist_queue_depth", "Requests waiting to be scheduled", stats.num_waiting)
        yield _gauge("alchemist_running_batch_size", "Requests in the running batch", stats.num_running)
        yield _gauge("alchemist_kv_blocks_used", "KV cache blocks in use", stats.kv_blocks_used)
        yield _gauge("alchemist_kv_blocks_total", "KV cache blocks in all", stats.kv_blocks_total)
        yield _gauge(
            "alchemist_generation_tokens_per_second",
            f"Generated tokens per second over the last {THROUGHPUT_WINDOW_S:.0f} s",
            self.metrics.tokens_per_second(),
        )
        yield _gauge("alchemist_weight_version", "Weight version being served", stats.weight_version)
        yield _counter("alchemist_prompt_tokens", "Prompt tokens prefilled", stats.prompt_tokens_total)
        yield _counter("alchemist_generation_tokens", "Tokens generated", stats.generated_tokens_total)
        yield _counter(
            "alchemist_preemptions", "Sequences preempted (recomputed later)", stats.num_preemptions
        )
        yield _counter(
            "alchemist_recorded_requests", "Requests recorded at prefill", stats.recorded_requests_total
        )
        yield _counter(
            "alchemist_records_evicted", "Records evicted from the store", stats.records_evicted_total
        )
        tiers = GaugeMetricFamily(
            "alchemist_recorded_bytes", "Bytes of prefill records held, by memory tier", labels=["tier"]
        )
        for tier, size in sorted(stats.recorded_bytes_by_tier.items()):
            tiers.add_metric([tier], size)
        yield tiers


class _GpuCollector(Collector):
    """GPU memory and utilization per device through NVML; yields nothing where NVML is missing."""

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as exc:  # no driver, no library, no GPU: nothing to report
            log.debug("NVML unavailable, no GPU metrics: %s", exc)

    def collect(self) -> Iterable[Any]:
        if self._nvml is None:
            return []
        nv = self._nvml
        used = GaugeMetricFamily("alchemist_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily("alchemist_gpu_memory_total_bytes", "GPU memory in all", labels=["gpu"])
        util = GaugeMetricFamily("alchemist_gpu_utilization_ratio", "GPU busy fraction", labels=["gpu"])
        for index in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            memory = nv.nvmlDeviceGetMemoryInfo(handle)
            used.add_metric([str(index)], memory.used)
            total.add_metric([str(index)], memory.total)
            util.add_metric([str(index)], nv.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
        return [used, total, util]


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
