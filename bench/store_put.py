"""What the activation store's own bookkeeping costs per record: `put` into a full store, evicting the oldest.

The engine commits each recorded prefill's records inside its step, so this CPU time is part of what recording
adds to a prefill (bench/recording_overhead.py times it with the rest). Records here are empty tensors shaped like
a `full` record of SmolLM2-135M (30 layers, hidden 576, 9 query and 3 key/value heads of 64, intermediate 1536)
for a 256-token prompt, one tensor per field as the recorder's copies are; the store's budget holds one record, so
every put evicts one.

    python bench/store_put.py --puts 200
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.activations.records import SequenceRecord
from alchemist_worker.activations.store import ActivationStore, StoreConfig


def full_record(args: argparse.Namespace) -> SequenceRecord:
    q, kv = args.heads * args.head_dim, args.kv_heads * args.head_dim
    widths = {
        "x": args.hidden, "k": kv, "v": kv, "q_lin": q, "attn": q, "lse": args.heads, "o": args.hidden,
        "gate": args.intermediate, "up": args.intermediate,
    }  # fmt: skip
    layers = [{name: torch.empty(args.tokens, w) for name, w in widths.items()} for _ in range(args.layers)]
    return SequenceRecord(
        policy=RecordingPolicy.FULL,
        version=0,
        token_ids=torch.zeros(args.tokens, dtype=torch.long),
        layers=layers,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--puts", type=int, default=200)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--intermediate", type=int, default=1536)
    args = ap.parse_args()
    record = full_record(args)
    size, tensors = record.nbytes(), sum(len(layer) for layer in record.layers)
    store = ActivationStore(StoreConfig(device_budget_bytes=size, host_budget_bytes=size))
    seconds = []
    for i in range(args.puts + 5):  # the first puts fill the tiers
        record = record if i == 0 else full_record(args)
        started = time.perf_counter()
        store.put(f"r{i}", record)
        seconds.append(time.perf_counter() - started)
    timed = seconds[5:]
    print(
        f"put into a full store: median {statistics.median(timed) * 1e3:.2f} ms, "
        f"{statistics.median(timed) / tensors * 1e6:.1f} us per tensor "
        f"({tensors} tensors, {size / 2**20:.0f} MiB a record, {args.puts} puts)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
