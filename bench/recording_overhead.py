"""What recording at prefill costs, measured in one process, policies interleaved round by round.

The load generator (serving_load.py) measures end to end but runs each configuration as its own server, one
after the other, so on a shared machine its differences mix recording cost with load drift. Here four engines
(recording off, kv, selective, full) share one model in one process; each round times, for every policy in a
rotating order, one engine step that prefills a prompt (recorded unless off) and a few decode steps of a
small batch. Medians over rounds are reported side by side; each "vs off" is the median over rounds of the
ratio to off's step in the same round. Between-run noise on a shared machine can exceed
the cost itself, so the recording work is also timed inside each recorded step (every `record_layer` copy and
the store commit): its share of the same step is the direct measure of what recording adds to a prefill.

Each recording engine's store has a byte budget (`--store-mib` per tier) and is filled before timing starts
until it evicts, so the timed prefills run in the steady state of a serving process: each new record pushes
an old one out, and its memory is memory the process has touched before. `--store-mib 0` gives the stores
room for every record of the run instead (the state while a store fills up for the first time): then each
record is fresh memory, and first-touching its pages is part of what the step costs.

`--sampled K` records only the first K of the `--prompts` prefilled together (the others are served and not
recorded, as with a sample rate below 1): the recorded prompt's rows are then copied out of the step's buffers.
Those copies run on the recording's copy thread; `--copies-in-step` adds, for each policy, an engine whose
recording copies inside the step instead (`<policy>/in-step`), to measure what the thread moves off the step.

    .venv/bin/python bench/recording_overhead.py --prompt 256 --rounds 7
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.activations.store import ActivationStore, StoreConfig
from alchemist_worker.engine.config import EngineConfig, RecordingConfig
from alchemist_worker.engine.llm_engine import LLMEngine
from alchemist_worker.engine.sampling_params import SamplingParams
from alchemist_worker.engine.serving_engine import GenerationRequest
from alchemist_worker.engine.serving_tokenizer import ServingTokenizer
from alchemist_worker.engine.store_recording import StoreRecording
from alchemist_worker.model.checkpoint import load_model
from alchemist_worker.model.layer_activations import LayerActivations, Recorder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: `bench` importable
from bench.store_steady_state import UNBOUNDED_BYTES, evictions, fill_store, measure_step

POLICIES = ("off", "kv", "selective", "full")
IN_STEP = "/in-step"  # suffix of a configuration whose recorder copies inside the step (no copy thread)


class TimedRecorder:
    """Passes hook calls through to the real recorder and adds up the seconds they take."""

    def __init__(self, inner: Recorder, clock: list[float]) -> None:
        self.inner = inner
        self.clock = clock

    @property
    def wants_lse(self) -> bool:
        return self.inner.wants_lse

    def record_layer(self, layer: int, activations: LayerActivations) -> None:
        started = time.perf_counter()
        self.inner.record_layer(layer, activations)
        self.clock[0] += time.perf_counter() - started


class TimedRecording(StoreRecording):
    """StoreRecording that measures its own work: per-layer copies during the forward, and the commit."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.seconds = [0.0]

    def begin(
        self, cu_seqlens: list[int], input_ids: list[int], record_ids: list[str | None], weight_version: int
    ) -> Recorder:
        started = time.perf_counter()
        inner = super().begin(cu_seqlens, input_ids, record_ids, weight_version)
        self.seconds[0] += time.perf_counter() - started
        return TimedRecorder(inner, self.seconds)

    def commit(self, recorder: Recorder) -> None:
        started = time.perf_counter()
        super().commit(recorder.inner if isinstance(recorder, TimedRecorder) else recorder)
        self.seconds[0] += time.perf_counter() - started


def build(
    model_path: Path, model: torch.nn.Module, tokenizer: ServingTokenizer, policy: str, store_bytes: int
) -> LLMEngine:
    recording = None
    in_step = policy.endswith(IN_STEP)
    policy = policy.removesuffix(IN_STEP)
    if policy != "off":
        store = ActivationStore(StoreConfig(device_budget_bytes=store_bytes, host_budget_bytes=store_bytes))
        recording = TimedRecording(store, RecordingPolicy(policy), model.config)
        if in_step:
            recording.copy_thread = None
    config = EngineConfig(
        model=model_path, dtype="float32", device="cpu", max_model_len=2048, kv_cache_bytes=128 << 20,
        recording=RecordingConfig(policy=policy, rate=1.0),
    )  # fmt: skip
    return LLMEngine(
        config,
        model,
        tokenizer,
        device=torch.device("cpu"),
        dtype=torch.float32,
        recording=recording,  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class RoundTimes:
    prefill_s: float  # wall seconds of the prefill step
    prefill_cpu_s: float  # CPU seconds the engine's thread spent in it (waiting for a core not counted)
    prefill_process_cpu_s: float  # CPU seconds of the whole process in it (the copy thread's included)
    prefill_new_mib: float  # memory the process touched for the first time during it (minor page faults)
    decode_s: float  # mean wall seconds of a decode step of the batch


def time_round(
    engine: LLMEngine, prompts: list[list[int]], batch: list[list[int]], decode_steps: int, sampled: int
) -> RoundTimes:
    """Times one step prefilling `prompts` together (the first `sampled` recorded, unless off) and a few decode
    steps of `batch`; the engine ends idle."""
    params = SamplingParams(max_tokens=decode_steps + 1, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(
            GenerationRequest(f"p{i}-{time.monotonic_ns()}", prompt, params, record=i < sampled)
        )
    prefill = measure_step(engine.step)
    while engine.has_unfinished():
        engine.step()
    for i, tokens in enumerate(batch):
        engine.add_request(GenerationRequest(f"d{i}-{time.monotonic_ns()}", tokens, params, record=False))
    engine.step()  # prefill of the decode batch, not timed
    started = time.perf_counter()
    for _ in range(decode_steps):
        engine.step()
    decode = (time.perf_counter() - started) / decode_steps
    while engine.has_unfinished():
        engine.step()
    return RoundTimes(prefill.wall_s, prefill.cpu_s, prefill.process_cpu_s, prefill.new_mib, decode)


def store_of(engine: LLMEngine) -> ActivationStore | None:
    recording = engine.recording
    return recording.store if isinstance(recording, StoreRecording) else None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens of the timed prefill")
    parser.add_argument(
        "--prompts",
        type=int,
        default=1,
        help="prompts prefilled together in the timed step, each --prompt long",
    )
    parser.add_argument(
        "--sampled", type=int, default=None,
        help="how many of the --prompts are recorded (the first ones; default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--copies-in-step", action="store_true",
        help="also run each policy with its copies made inside the step, not on the copy thread",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=4, help="sequences in the timed decode steps")
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--store-mib", type=int, default=256,
        help="each store tier's budget, filled before timing (0: room for every record, nothing evicted)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    if args.model is None:
        from alchemist_worker.bundled_model import ensure_small_model

        args.model = ensure_small_model()
    model = load_model(args.model, dtype=torch.float32)
    tokenizer = ServingTokenizer.from_pretrained(args.model, model.config.eos_token_ids)
    store_bytes = args.store_mib << 20 if args.store_mib else UNBOUNDED_BYTES
    sampled = args.prompts if args.sampled is None else args.sampled
    configs = list(POLICIES)
    if args.copies_in_step:
        configs += [policy + IN_STEP for policy in POLICIES if policy != "off"]
    engines = {config: build(args.model, model, tokenizer, config, store_bytes) for config in configs}
    rng = random.Random(args.seed)
    fill_rng = random.Random(args.seed + 1)  # the timed prompts do not depend on the fill
    filled = {
        p: fill_store(engines[p], store, fill_rng, args.prompt)
        if args.store_mib and (store := store_of(engines[p])) is not None
        else 0
        for p in configs
    }
    evicted_before = {p: evictions(store_of(engines[p])) for p in configs}
    rounds: dict[str, list[RoundTimes]] = {p: [] for p in configs}
    share: dict[str, list[float]] = {p: [] for p in configs}
    for round_index in range(args.rounds + 1):  # round 0 warms up and is discarded
        prompts = [[rng.randrange(1000, 30000) for _ in range(args.prompt)] for _ in range(args.prompts)]
        batch = [[rng.randrange(1000, 30000) for _ in range(16)] for _ in range(args.batch)]
        turn = round_index % len(configs)
        for policy in configs[turn:] + configs[:turn]:
            recording = engines[policy].recording
            before = recording.seconds[0] if isinstance(recording, TimedRecording) else 0.0
            times = time_round(engines[policy], prompts, batch, args.decode_steps, sampled)
            spent = (recording.seconds[0] if isinstance(recording, TimedRecording) else 0.0) - before
            if round_index:
                rounds[policy].append(times)
                share[policy].append(spent / times.prefill_s)

    def median(policy: str, name: str) -> float:
        return statistics.median(getattr(r, name) for r in rounds[policy])

    def paired(policy: str, name: str) -> float:
        """Median over rounds of the step against off's step of the same round, minus 1."""
        ratios = [
            getattr(r, name) / getattr(o, name) for r, o in zip(rounds[policy], rounds["off"], strict=True)
        ]
        return statistics.median(ratios) - 1

    options = f" --sampled {sampled}" if sampled != args.prompts else ""
    options += " --copies-in-step" if args.copies_in_step else ""
    print(f"Command: `python bench/recording_overhead.py --prompt {args.prompt} --prompts {args.prompts}{options} "
          f"--batch {args.batch} --decode-steps {args.decode_steps} --rounds {args.rounds} "
          f"--cpu-threads {args.cpu_threads} --store-mib {args.store_mib}`; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")  # fmt: skip
    print(
        "| recording | prefill step, median (ms) | vs off | engine thread's CPU time in the prefill, median "
        "(ms) | vs off | process CPU time in the prefill, median (ms) | vs off | "
        "memory first touched in the prefill (MiB) | recording work inside the step, median | "
        "decode step, median (ms) | vs off | MiB per record | fill prefills | evicted while timed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for policy in configs:
        p, c, pc, d = (
            median(policy, name)
            for name in ("prefill_s", "prefill_cpu_s", "prefill_process_cpu_s", "decode_s")
        )
        recording = engines[policy].recording
        size = 0.0
        if isinstance(recording, StoreRecording) and len(recording.store):
            stored = recording.store.device_bytes + recording.store.host_bytes
            size = stored / len(recording.store) / 2**20
        print(
            f"| {policy} | {1000 * p:.0f} | {paired(policy, 'prefill_s'):+.1%} | {1000 * c:.0f} "
            f"| {paired(policy, 'prefill_cpu_s'):+.1%} | {1000 * pc:.0f} "
            f"| {paired(policy, 'prefill_process_cpu_s'):+.1%} | {median(policy, 'prefill_new_mib'):.1f} "
            f"| {statistics.median(share[policy]):.1%} | {1000 * d:.1f} | {paired(policy, 'decode_s'):+.1%} "
            f"| {size:.1f} | {filled[policy]} | {evictions(store_of(engines[policy])) - evicted_before[policy]} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
