"""Benchmark: the response loss over a large vocabulary, unchunked against chunked (training/loss.py).

    python -m bench.loss_chunks --rows 256 512

On SmolLM2-135M's output projection shape (hidden 576, vocabulary 49152; random weights, fp32, one thread),
busy CPU ms (median of --reps) of:
- the whole loss, forward and backward: unchunked `F.cross_entropy` over all rows' logits; the same with the
  logits made 8 rows at a time, as the co-located trainer's `compute_logits` does; and the chunked loss;
- its longest indivisible piece, which a training slice may have to wait for: for the unchunked loss, its
  largest operator (the head GEMM, the log-softmax or their backward over all rows); for the chunked loss, one
  chunk's forward (it has no yield point inside).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from alchemist_worker.training.loss import _ChunkCrossEntropy, chunk_rows, chunked_cross_entropy_sum

HIDDEN, VOCAB = 576, 49152


def busy_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e3


def measure(rows: int, reps: int) -> list[tuple[str, float, float]]:
    """(method, whole loss ms, longest piece ms) for `rows` response rows."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02
    hidden = torch.randn(rows, HIDDEN, generator=gen)
    labels = torch.randint(0, VOCAB, (rows,), generator=gen)

    def unchunked() -> None:
        h = hidden.clone().requires_grad_()
        F.cross_entropy(F.linear(h, weight).float(), labels, reduction="sum").backward()

    def logits_in_8_rows() -> None:
        h = hidden.clone().requires_grad_()
        logits = torch.cat([F.linear(part, weight) for part in h.split(8)])
        F.cross_entropy(logits.float(), labels, reduction="sum").backward()

    chunk = chunk_rows(VOCAB)

    def chunked() -> None:
        h = hidden.clone().requires_grad_()
        chunked_cross_entropy_sum(h, weight, labels, rows=chunk).backward()

    logits = F.linear(hidden, weight)
    log_probs = torch.log_softmax(logits, -1)
    grad = torch.randn_like(logits)
    pieces = {
        "head GEMM": busy_ms(lambda: F.linear(hidden, weight), reps),
        "log-softmax": busy_ms(lambda: torch.log_softmax(logits, -1), reps),
        "log-softmax backward": busy_ms(
            lambda: torch._log_softmax_backward_data(grad, log_probs, -1, torch.float32), reps
        ),
        "head GEMM backward": busy_ms(lambda: grad @ weight, reps),
    }
    first = hidden[:chunk].clone().requires_grad_()
    one_chunk = busy_ms(lambda: _ChunkCrossEntropy.apply(first, weight, labels[:chunk]), reps)
    eight = {k: v for k, v in pieces.items() if not k.startswith("head GEMM")}
    eight["8-row head GEMM"] = busy_ms(lambda: F.linear(hidden[:8], weight), reps)
    return [
        (
            f"unchunked (longest: {max(pieces, key=pieces.__getitem__)})",
            busy_ms(unchunked, reps),
            max(pieces.values()),
        ),
        (
            f"logits 8 rows at a time, one cross-entropy (longest: {max(eight, key=eight.__getitem__)})",
            busy_ms(logits_in_8_rows, reps),
            max(eight.values()),
        ),
        (
            f"chunked loss, {chunk}-row chunks (longest: one chunk's forward)",
            busy_ms(chunked, reps),
            one_chunk,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"load average before: {'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| response rows | method | whole loss, fwd+bwd CPU ms | longest indivisible piece CPU ms |")
    print("|---:|---|---:|---:|")
    for rows in args.rows:
        for method, whole, longest in measure(rows, args.reps):
            print(f"| {rows} | {method} | {whole:.0f} | {longest:.1f} |")
    print(f"load average after: {'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
