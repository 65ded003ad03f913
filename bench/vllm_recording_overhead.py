"""What recording costs inside vLLM's prefill step, measured in one process with the configurations interleaved.

Two vLLM engines (our model class, weights shared as for training, compiled unless --eager) serve a stream of
rounds; in each round, for every configuration in a rotating order, one of them prefills a fresh prompt of
--prompt tokens while a small batch decodes, and the step that holds the prefill is timed. Configurations:
- `plain`: an engine that never records, so its compiled code has no record op (what every unrecorded step ran
  before recording moved into the compiled code);
- `off`: the recording engine, this prompt not recorded: the record op is called and returns at once;
- `kv`, `selective`, `full`: the recording engine records the prompt inside its compiled code (the record op
  copies what the policy keeps, see docs/vllm-engine.md). The recording's own work (the op's copies, the
  records' assembly, the commit to the store) is also timed inside the step.
Medians over rounds. A decode step after each prefill is timed too: decodes never record (the recording engine
still calls the op).

    .venv/bin/python bench/vllm_recording_overhead.py --prompt 256 --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.engine.config import EngineConfig, RecordingConfig
from alchemist_worker.engine.sampling_params import SamplingParams
from alchemist_worker.engine.serving_engine import GenerationRequest
from alchemist_worker.engine.store_recording import StoreRecording
from alchemist_worker.model.config import ModelConfig

CONFIGS = ("plain", "off", "kv", "selective", "full")


def timed_plan(engine: Any, clock: list[float]) -> None:
    """Wraps the engine's step planning so the seconds of every step recording's own work add up in `clock`."""
    plan = engine._plan_step

    def planned(output: Any) -> Any:
        step = plan(output)
        if step is None:
            return None
        for name in ("start", "take", "finish"):
            inner = getattr(step, name)

            def timed(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return _inner(*args, **kwargs)
                finally:
                    clock[0] += time.perf_counter() - started

            setattr(step, name, timed)
        return step

    engine._plan_step = planned


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="checkpoint (default: SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--eager", action="store_true", help="run every step eagerly (no compilation)")
    args = parser.parse_args()
    if args.model is None:
        from alchemist_worker.bundled_model import ensure_small_model

        args.model = ensure_small_model()
    from alchemist_worker.vllm_backend.engine import VllmEngine

    recording = RecordingConfig(
        policy="full", rate=1.0, device_budget_bytes=4 << 30, host_budget_bytes=4 << 30
    )
    config = EngineConfig(
        model=args.model, dtype="float32", max_model_len=2048, kv_cache_bytes=256 << 20, recording=recording
    )
    store = StoreRecording.from_config(recording, ModelConfig.from_pretrained(args.model), "cpu")
    engine = VllmEngine(config, recording=store, compile=not args.eager)
    plain = VllmEngine(replace(config, recording=RecordingConfig()), compile=not args.eager)
    clock = [0.0]
    timed_plan(engine, clock)
    gen = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size
    greedy = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)
    for serving in (engine, plain):
        for i in range(4):  # a decoding batch the prefills join
            prompt = torch.randint(10, vocab, (32,), generator=gen).tolist()
            serving.add_request(GenerationRequest(f"bg{i}", prompt, greedy, record=False))
        serving.step()
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    hooks: dict[str, list[float]] = {c: [] for c in CONFIGS}
    decodes: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for round_no in range(args.rounds + 1):  # round 0 warms every path up
        shift = round_no % len(CONFIGS)
        for name in CONFIGS[shift:] + CONFIGS[:shift]:
            recorded = name not in ("off", "plain")
            serving = plain if name == "plain" else engine
            if recorded:
                engine.policy = RecordingPolicy(name)
            prompt = torch.randint(10, vocab, (args.prompt,), generator=gen).tolist()
            rid = f"p{round_no}-{name}"
            params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
            serving.add_request(GenerationRequest(rid, prompt, params, record=recorded))
            clock[0] = 0.0
            started = time.perf_counter()
            serving.step()  # the prefill, with the decoding batch
            elapsed = time.perf_counter() - started
            started = time.perf_counter()
            serving.step()  # a decode step (the prefilled request decodes its second token)
            decode = time.perf_counter() - started
            if round_no:
                times[name].append(elapsed)
                hooks[name].append(clock[0])
                decodes[name].append(decode)
            if recorded:
                assert store.store.pop(rid) is not None, f"{rid} was not recorded"
    base, plain_step = statistics.median(times["off"]), statistics.median(times["plain"])
    print(
        f"vLLM engine, {'eager' if args.eager else 'compiled'}; prompt {args.prompt} tokens joining 4 decoding "
        f"requests; medians over {args.rounds} rounds; {torch.get_num_threads()} torch threads; "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n"
    )
    print(
        "| config | prefill step (ms) | vs off | vs plain | recording's work in the step (ms) | its share "
        "| decode step (ms) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in CONFIGS:
        step, hook = statistics.median(times[name]), statistics.median(hooks[name])
        print(
            f"| {name} | {1000 * step:.1f} | {step / base - 1:+.1%} | {step / plain_step - 1:+.1%} "
            f"| {1000 * hook:.1f} | {hook / step:.1%} | {1000 * statistics.median(decodes[name]):.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
