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
Medians over rounds; the ratios are medians of each round's ratio (the configurations of one round run one after
the other, so a slow spell of a machine shared with other work weighs on both sides of most ratios); and the
fastest round of each configuration, which on a shared machine is nearest to the step's own cost. A decode step after each
prefill is timed too: decodes never record (the recording engine still calls the op). Last, --decode-rounds steps
of each engine's decoding batch alone, interleaved: what the op costs a decode step.

    .venv/bin/python bench/vllm_recording_overhead.py --prompt 256 --rounds 9
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
    parser.add_argument("--decode-rounds", type=int, default=40)
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

    def ratio(name: str, base: str) -> float:
        return statistics.median(a / b for a, b in zip(times[name], times[base], strict=True)) - 1

    print(
        f"vLLM engine, {'eager' if args.eager else 'compiled'}; prompt {args.prompt} tokens joining 4 decoding "
        f"requests; {args.rounds} rounds; {torch.get_num_threads()} torch threads; "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n"
    )
    print(
        "| config | prefill step, median (ms) | vs off | vs plain | fastest (ms) "
        "| recording's work in the step, median (ms) | decode step, median (ms) | vs plain | fastest (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in CONFIGS:
        decode_vs_plain = statistics.median(
            a / b for a, b in zip(decodes[name], decodes["plain"], strict=True)
        )
        print(
            f"| {name} | {1000 * statistics.median(times[name]):.1f} | {ratio(name, 'off'):+.1%} "
            f"| {ratio(name, 'plain'):+.1%} | {1000 * min(times[name]):.1f} "
            f"| {1000 * statistics.median(hooks[name]):.1f} | {1000 * statistics.median(decodes[name]):.1f} "
            f"| {decode_vs_plain - 1:+.1%} | {1000 * min(decodes[name]):.1f} |"
        )
    alone: dict[str, list[float]] = {"plain": [], "recording engine": []}
    for round_no in range(args.decode_rounds):  # the decoding batches alone: nothing is recorded
        pair = [("plain", plain), ("recording engine", engine)]
        for name, serving in pair[round_no % 2 :] + pair[: round_no % 2]:
            started = time.perf_counter()
            serving.step()
            alone[name].append(time.perf_counter() - started)
    ratio_alone = statistics.median(
        a / b for a, b in zip(alone["recording engine"], alone["plain"], strict=True)
    )
    print(
        f"\ndecode steps of the 4-request batch alone, {args.decode_rounds} rounds: "
        + ", ".join(
            f"{name} median {1000 * statistics.median(v):.1f} ms (fastest {1000 * min(v):.1f})"
            for name, v in alone.items()
        )
        + f"; recording engine vs plain {ratio_alone - 1:+.1%}"
    )
    calls = 3 * engine.model_config.num_layers
    seconds = op_call_seconds(engine.model_config.hidden_size)
    print(
        f"\nrecord op with nothing to record: {1e6 * seconds:.2f} us a call (fastest of 5 x 10000 calls, outside "
        f"a forward); {calls} calls a step: {1000 * calls * seconds:.2f} ms"
    )
    return 0


def op_call_seconds(width: int) -> float:
    """Seconds of one call of the record op that finds nothing to record (what an unrecorded step pays)."""
    import alchemist_worker.vllm_backend.record_op  # noqa: F401  (registers the op)

    op = torch.ops.alchemist.record.default
    token, tensors = torch.zeros(1), [torch.zeros(8, width) for _ in range(5)]
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(10000):
            op(token, 0, 1, tensors)
        best = min(best, (time.perf_counter() - started) / 10000)
    return best


if __name__ == "__main__":
    raise SystemExit(main())
