"""Pieces shared by the recording benchmarks (native and vLLM): a store in a serving process's steady state,
and what one timed engine step costs.

A serving process's activation store is full: each new record pushes an old one out, and the allocator gives the
new record memory the process touched before. A benchmark whose store never fills (or that frees every record
right after its step) times the other state, a store filling up for the first time, where every record is memory
never touched before and first-touching its pages (minor page faults, expensive on a sandboxed machine) is part
of the step. `fill_store` brings a store to the steady state before timing; `measure_step` reports, beside the
step's wall time, the CPU time of the calling thread and the memory first touched during the step.
"""

from __future__ import annotations

import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

from alchemist_worker.activations.store import ActivationStore, DropReason
from alchemist_worker.engine.sampling_params import SamplingParams
from alchemist_worker.engine.serving_engine import GenerationRequest, ServingEngine

UNBOUNDED_BYTES = 8 << 30  # room for every record of any run here
MAX_FILL_PREFILLS = 64  # a fill that has not evicted by then gives up (the budget is too large for the run)


def evictions(store: ActivationStore | None) -> int:
    """Records the store has evicted for its budget so far."""
    if store is None:
        return 0
    return store.stats().dropped.get(DropReason.EVICTED.value, 0)


def fill_store(engine: ServingEngine, store: ActivationStore, rng: random.Random, prompt_tokens: int) -> int:
    """Untimed recorded prefills on `engine` until `store` (its recording's) has evicted a record; returns how
    many ran. Other requests the engine is serving keep running; each fill request ends after its prefill."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for count in range(1, MAX_FILL_PREFILLS + 1):
        prompt = [rng.randrange(1000, 30000) for _ in range(prompt_tokens)]
        request_id = f"f{time.monotonic_ns()}"
        engine.add_request(GenerationRequest(request_id, prompt, params))
        while not any(out.request_id == request_id and out.finished for out in engine.step()):
            pass
        if evictions(store):
            return count
    raise SystemExit(f"the store never evicted in {MAX_FILL_PREFILLS} prefills: lower --store-mib")


@dataclass(frozen=True)
class StepCost:
    wall_s: float  # wall seconds of the step
    cpu_s: float  # CPU seconds the calling thread spent in it (waiting for a core not counted)
    process_cpu_s: float  # CPU seconds of every thread of the process during it (a copy thread's too)
    new_mib: float  # memory the process touched for the first time during it (minor page faults)


def measure_step(step: Callable[[], object]) -> StepCost:
    """Runs `step()` once and says what it cost."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu, process_cpu = time.thread_time(), time.process_time()
    started = time.perf_counter()
    step()
    wall = time.perf_counter() - started
    cpu, process_cpu = time.thread_time() - cpu, time.process_time() - process_cpu
    new_pages = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return StepCost(wall, cpu, process_cpu, new_pages * resource.getpagesize() / 2**20)
