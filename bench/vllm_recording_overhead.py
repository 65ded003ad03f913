"""What recording costs inside vLLM's prefill step, measured in one process with the configurations interleaved.

Two vLLM engines (our model class, weights shared as for training, compiled unless --eager) serve a stream of
rounds; in each round, for every configuration in a rotating order, one of them prefills a fresh prompt of
--prompt tokens while a small batch decodes, and the step that holds the prefill is timed. Configurations:
- `plain`: an engine that never records, so its compiled code has no record op (what every unrecorded step ran
  before recording moved into the compiled code);
- `off`: the recording engine, this prompt not recorded: the record op is called and returns at once;
- `kv`, `selective`, `full`: the recording engine records the prompt inside its compiled code (the record op
  copies what the policy keeps, see docs/vllm-engine.md). The recording's own work (the op's copies, the
  records' assembly, the commit to the store) is also timed inside the step;
- `full-bf16`: `full` with the records stored in bfloat16 (`RecordingConfig.dtype`): half the bytes to copy.
The recording engine's store has a byte budget (`--store-mib` per tier) and is filled before timing until it
evicts, so the timed prefills run in a serving process's steady state: each new record pushes old ones out and
gets memory the process touched before (bench/store_steady_state.py). `--store-mib 0` gives it room for every
record and frees each record after its round instead (this bench's earlier setting). Each prefill step also
reports the memory it touched for the first time (minor page faults) and the CPU time of the engine's thread.
Medians over rounds; the ratios are medians of each round's ratio (the configurations of one round run one after
the other, so a slow spell of a machine shared with other work weighs on both sides of most ratios); and the
fastest round of each configuration, which on a shared machine is nearest to the step's own cost. A decode step after each
prefill is timed too: decodes never record (the recording engine still calls the op). Last, --decode-rounds steps
of each engine's decoding batch alone, interleaved: what the op costs a decode step. Then, outside any step, the
recording's work alone for each recorded configuration (a `StepRecording` fed tensors of the step's shapes, its
record put into the same store) and the bare copy of a `full` record into float32 and bfloat16 tensors.

    .venv/bin/python bench/vllm_recording_overhead.py --prompt 256 --rounds 9
    VLLM_CPU_OMP_THREADS_BIND=nobind OMP_NUM_THREADS=1 .venv/bin/python bench/vllm_recording_overhead.py ...
    # one torch thread: on a machine shared with other work, two bound threads wait for each other
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.activations.records import SequenceRecord
from alchemist_worker.engine.config import EngineConfig, RecordingConfig
from alchemist_worker.engine.sampling_params import SamplingParams
from alchemist_worker.engine.serving_engine import GenerationRequest
from alchemist_worker.engine.store_recording import StoreRecording
from alchemist_worker.model.config import ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: `bench` importable
from bench.store_steady_state import UNBOUNDED_BYTES, StepCost, evictions, fill_store, measure_step

CONFIGS = ("plain", "off", "kv", "selective", "full", "full-bf16")
# the recorded configurations: (policy, record dtype; None: the model's)
RECORDED: dict[str, tuple[str, torch.dtype | None]] = {
    "kv": ("kv", None),
    "selective": ("selective", None),
    "full": ("full", None),
    "full-bf16": ("full", torch.bfloat16),
}


@dataclass(frozen=True)
class Round:
    prefill: StepCost
    recording_s: float  # the recording's own work inside the prefill step
    decode_s: float  # the decode step after it
    record_mib: float  # the record's size


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
    parser.add_argument(
        "--store-mib", type=int, default=256,
        help="the store's budget per tier, filled before timing (0: room for every record, each freed after "
        "its round)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.model is None:
        from alchemist_worker.bundled_model import ensure_small_model

        args.model = ensure_small_model()
    from alchemist_worker.vllm_backend.engine import VllmEngine

    store_bytes = args.store_mib << 20 if args.store_mib else UNBOUNDED_BYTES
    recording = RecordingConfig(
        policy="full", rate=1.0, device_budget_bytes=store_bytes, host_budget_bytes=store_bytes
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
    filled = fill_store(engine, store.store, random.Random(1), args.prompt) if args.store_mib else 0
    evicted_before = evictions(store.store)
    greedy = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)
    for serving in (engine, plain):
        for i in range(4):  # a decoding batch the prefills join
            prompt = torch.randint(10, vocab, (32,), generator=gen).tolist()
            serving.add_request(GenerationRequest(f"bg{i}", prompt, greedy, record=False))
        serving.step()
    rounds: dict[str, list[Round]] = {c: [] for c in CONFIGS}
    for round_no in range(args.rounds + 1):  # round 0 warms every path up
        shift = round_no % len(CONFIGS)
        for name in CONFIGS[shift:] + CONFIGS[:shift]:
            recorded = name in RECORDED
            serving = plain if name == "plain" else engine
            if recorded:
                policy, store.record_dtype = RECORDED[name]
                engine.policy = RecordingPolicy(policy)
            prompt = torch.randint(10, vocab, (args.prompt,), generator=gen).tolist()
            rid = f"p{round_no}-{name}"
            params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
            serving.add_request(GenerationRequest(rid, prompt, params, record=recorded))
            clock[0] = 0.0
            prefill = measure_step(serving.step)  # the prefill, with the decoding batch
            recording_s = clock[0]
            size = 0.0
            if recorded:  # the record is the store's newest: there unless the budget cannot hold it at all
                if rid not in store.store:
                    raise SystemExit(f"{rid} was not recorded (a record larger than --store-mib?)")
                size = store.store.peek(rid).nbytes() / 2**20
            started = time.perf_counter()
            serving.step()  # a decode step (the prefilled request decodes its second token)
            decode = time.perf_counter() - started
            if recorded and not args.store_mib:
                store.store.pop(rid)
            if round_no:
                rounds[name].append(Round(prefill, recording_s, decode, size))

    def median(name: str, value: Any) -> float:
        return statistics.median(value(r) for r in rounds[name])

    def ratio(name: str, base: str, value: Any) -> float:
        pairs = zip(rounds[name], rounds[base], strict=True)
        return statistics.median(value(a) / value(b) for a, b in pairs) - 1

    def wall(r: Round) -> float:
        return r.prefill.wall_s

    def cpu(r: Round) -> float:
        return r.prefill.cpu_s

    def decode_s(r: Round) -> float:
        return r.decode_s

    print(
        f"vLLM engine, {'eager' if args.eager else 'compiled'}; prompt {args.prompt} tokens joining 4 decoding "
        f"requests; {args.rounds} rounds; {torch.get_num_threads()} torch threads; store "
        + (
            f"{args.store_mib} MiB per tier, filled by {filled} prefills before timing, "
            f"{evictions(store.store) - evicted_before} records evicted while timed"
            if args.store_mib
            else "unbounded, each record freed after its round"
        )
        + f"; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n"
    )
    print(
        "| config | prefill step, median (ms) | vs off | vs plain | fastest (ms) | prefill CPU time of the "
        "engine thread, median (ms) | vs off | memory first touched in the prefill step, median (MiB) "
        "| recording's work in the step, median (ms) | fastest (ms) | MiB per record | decode step, median (ms) "
        "| vs plain |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in CONFIGS:
        print(
            f"| {name} | {1000 * median(name, wall):.1f} | {ratio(name, 'off', wall):+.1%} "
            f"| {ratio(name, 'plain', wall):+.1%} | {1000 * min(wall(r) for r in rounds[name]):.1f} "
            f"| {1000 * median(name, cpu):.1f} | {ratio(name, 'off', cpu):+.1%} "
            f"| {median(name, lambda r: r.prefill.new_mib):.1f} | {1000 * median(name, lambda r: r.recording_s):.1f} "
            f"| {1000 * min(r.recording_s for r in rounds[name]):.1f} "
            f"| {median(name, lambda r: r.record_mib):.1f} | {1000 * median(name, decode_s):.1f} "
            f"| {ratio(name, 'plain', decode_s):+.1%} |"
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
    engine.policy, store.record_dtype = RecordingPolicy("full"), None  # one more full record, untimed
    prompt = torch.randint(10, vocab, (args.prompt,), generator=gen).tolist()
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    engine.add_request(GenerationRequest("copied", prompt, params, record=True))
    while "copied" not in store.store:
        engine.step()
    record = store.store.peek("copied")
    work_alone = {
        name: recording_alone_seconds(engine.model_config, store, name, args.prompt) for name in RECORDED
    }
    print(
        "\nthe recording's work alone, outside a step (fastest of 5): a StepRecording fed tensors of the step's "
        "shapes as the record op feeds it, its record put into the same store: "
        + ", ".join(f"{name} {1000 * seconds:.1f} ms" for name, seconds in work_alone.items())
    )
    print(
        f"copies of a full record's {record.nbytes() / 2**20:.0f} MiB alone, outside a step (every tensor of it "
        "into a new tensor, as the record op copies the step's rows; best of 5, each attempt's "
        "copies freed): "
        + ", ".join(
            f"into {dtype} {1000 * cost.wall_s:.1f} ms ({cost.new_mib:.1f} MiB first touched)"
            for dtype, cost in ((d, copy_cost(record, d)) for d in ("float32", "bfloat16"))
        )
    )
    calls = 3 * engine.model_config.num_layers
    seconds = op_call_seconds(engine.model_config.hidden_size)
    print(
        f"\nrecord op with nothing to record: {1e6 * seconds:.2f} us a call (fastest of 5 x 10000 calls, outside "
        f"a forward); {calls} calls a step: {1000 * calls * seconds:.2f} ms"
    )
    return 0


def recording_alone_seconds(
    config: ModelConfig, store: StoreRecording, name: str, prompt_tokens: int
) -> float:
    """Seconds of the recording's own work for one prompt of `prompt_tokens` joining 4 decodes, outside any step
    (fastest of 5): `StepRecording.start`, the three `take` calls per layer with tensors shaped and strided as the
    model hands them over, and `finish`, which puts the record into `store`."""
    from alchemist_worker.vllm_backend.step_recording import BatchLayout, PromptRecording, StepRecording

    rows = prompt_tokens + 4
    with torch.inference_mode():  # as vLLM's forward makes them
        qkv = torch.randn(rows, config.q_size + 2 * config.kv_size)
        q_lin, k_lin, v = qkv.split([config.q_size, config.kv_size, config.kv_size], dim=-1)
        x, o = torch.randn(rows, config.hidden_size), torch.randn(rows, config.hidden_size)
        attn = torch.randn(rows, config.num_heads, config.head_dim)
        gate_up = torch.randn(rows, 2 * config.intermediate_size)
        input_ids = torch.randint(10, 1000, (rows,))
    heads = (rows, config.num_kv_heads, config.head_dim)
    parts = (
        (q_lin, k_lin),
        (x, k_lin.view(heads), v.view(heads), attn, o),
        gate_up.split(config.intermediate_size, -1),
    )
    layout = BatchLayout(
        req_ids=["bg0", "bg1", "bg2", "bg3", "p"],
        query_start_loc=[0, 1, 2, 3, 4, rows],
        num_computed=[32] * 4 + [0],
    )
    policy, dtype = RECORDED[name]

    def put(record_id: str, record: SequenceRecord) -> None:
        store.store.put(record_id, record)

    best = float("inf")
    for attempt in range(5):
        prompt = PromptRecording(f"alone-{name}-{attempt}", prompt_tokens, 0)
        step = StepRecording(
            RecordingPolicy(policy),
            config,
            {"p": prompt},
            layout_of=lambda: layout,
            on_complete=put,
            record_dtype=dtype,
        )
        started = time.perf_counter()
        step.start(input_ids)
        for layer in range(config.num_layers):
            for part, tensors in enumerate(parts):
                step.take(layer, part, tensors)
        step.finish()
        best = min(best, time.perf_counter() - started)
        if prompt.response_id not in store.store:
            raise SystemExit(f"{prompt.response_id} was not stored")
    return best


def copy_cost(record: Any, dtype: str) -> StepCost:
    """Copying every tensor of `record` into new tensors of `dtype`: the fastest of 5 (each attempt's copies
    freed before the next)."""
    target = getattr(torch, dtype)
    best: StepCost | None = None
    tensors = [t for layer in record.layers for t in layer.values()]
    for _ in range(5):
        copies: list[torch.Tensor] = []

        def copy(into: list[torch.Tensor] = copies) -> None:
            into.extend(t.to(target, copy=True) for t in tensors)

        cost = measure_step(copy)
        copies.clear()
        if best is None or cost.wall_s < best.wall_s:
            best = cost
    assert best is not None
    return best


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
