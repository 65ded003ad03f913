"""What recording at prefill costs, measured in one process, policies interleaved round by round.

The load generator (serving_load.py) measures end to end but runs each configuration as its own server, one
after the other, so on a shared machine its differences mix recording cost with load drift. Here four engines
(recording off, kv, selective, full) share one model in one process; each round times, for every policy in a
rotating order, one engine step that prefills a prompt (recorded unless off) and a few decode steps of a
small batch. Medians over rounds are reported side by side. Between-run noise on a shared machine can exceed
the cost itself, so the recording work is also timed inside each recorded step (every `record_layer` copy and
the store commit): its share of the same step is the direct measure of what recording adds to a prefill.

    .venv/bin/python bench/recording_overhead.py --prompt 256 --rounds 7
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
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

POLICIES = ("off", "kv", "selective", "full")


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


def build(model_path: Path, model: torch.nn.Module, tokenizer: ServingTokenizer, policy: str) -> LLMEngine:
    recording = None
    if policy != "off":
        store = ActivationStore(StoreConfig(device_budget_bytes=8 << 30, host_budget_bytes=8 << 30))
        recording = TimedRecording(store, RecordingPolicy(policy), model.config)
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


def time_round(
    engine: LLMEngine, prompt: list[int], batch: list[list[int]], decode_steps: int
) -> tuple[float, float]:
    """(seconds of the prefill step, mean seconds of a decode step of `batch`); the engine ends idle."""
    params = SamplingParams(max_tokens=decode_steps + 1, temperature=0.0, ignore_eos=True)
    engine.add_request(GenerationRequest(f"p{time.monotonic_ns()}", prompt, params))
    started = time.perf_counter()
    engine.step()
    prefill = time.perf_counter() - started
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
    return prefill, decode


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens of the timed prefill")
    parser.add_argument("--batch", type=int, default=4, help="sequences in the timed decode steps")
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    if args.model is None:
        from alchemist_worker.bundled_model import ensure_small_model

        args.model = ensure_small_model()
    model = load_model(args.model, dtype=torch.float32)
    tokenizer = ServingTokenizer.from_pretrained(args.model, model.config.eos_token_ids)
    engines = {policy: build(args.model, model, tokenizer, policy) for policy in POLICIES}
    rng = random.Random(args.seed)
    prefill: dict[str, list[float]] = {p: [] for p in POLICIES}
    share: dict[str, list[float]] = {p: [] for p in POLICIES}
    decode: dict[str, list[float]] = {p: [] for p in POLICIES}
    for round_index in range(args.rounds + 1):  # round 0 warms up and is discarded
        prompt = [rng.randrange(1000, 30000) for _ in range(args.prompt)]
        batch = [[rng.randrange(1000, 30000) for _ in range(16)] for _ in range(args.batch)]
        order = POLICIES[round_index % 4 :] + POLICIES[: round_index % 4]
        for policy in order:
            recording = engines[policy].recording
            before = recording.seconds[0] if isinstance(recording, TimedRecording) else 0.0
            p, d = time_round(engines[policy], prompt, batch, args.decode_steps)
            spent = (recording.seconds[0] if isinstance(recording, TimedRecording) else 0.0) - before
            if round_index:
                prefill[policy].append(p)
                decode[policy].append(d)
                share[policy].append(spent / p)
    base_p, base_d = statistics.median(prefill["off"]), statistics.median(decode["off"])
    print(f"Command: `python bench/recording_overhead.py --prompt {args.prompt} --batch {args.batch} "
          f"--decode-steps {args.decode_steps} --rounds {args.rounds} --cpu-threads {args.cpu_threads}`; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")  # fmt: skip
    print(
        "| recording | prefill step, median (ms) | vs off | recording work inside the step, median | "
        "decode step, median (ms) | vs off | MiB per prompt |"
    )
    print("|---|---|---|---|---|---|---|")
    for policy in POLICIES:
        p, d = statistics.median(prefill[policy]), statistics.median(decode[policy])
        inside = statistics.median(share[policy])
        recording = engines[policy].recording
        size = 0.0
        if isinstance(recording, StoreRecording) and recording.recorded:
            size = (recording.store.device_bytes + recording.store.host_bytes) / recording.recorded / 2**20
        print(
            f"| {policy} | {1000 * p:.0f} | {p / base_p - 1:+.1%} | {inside:.1%} | {1000 * d:.1f} "
            f"| {d / base_d - 1:+.1%} | {size:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
