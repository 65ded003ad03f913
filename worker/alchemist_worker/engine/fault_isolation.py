"""One iteration under fault isolation: an exception fails only the sequences it belongs to.

A batched forward pass or sampling step that raises does not say which sequence caused it (one request's
seed or top-k can break the sampler for the whole batch). So a failed batch is run again one sequence at a
time: a sequence that fails alone is the culprit and fails with `RequestFailed`; the others get their tokens
as if nothing had happened. Running a sequence again is safe: an iteration's only side effects are the K/V
writes at the sequence's own cache slots (the same values again) and, at prefill, a recording that the engine
discards when the forward pass fails. A seeded request may have drawn part of its noise in the failed attempt,
so its tokens can differ from an undisturbed run; nothing else changes.

When no sequence succeeds, nobody can be blamed (the model or the device is broken, not a request): every one
fails with the retriable `EngineStepFailed`, and the engine loop counts the iteration as failed, which its
health check reports after a few in a row. This module does not import torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from alchemist_worker.engine.scheduler import ScheduledBatch
from alchemist_worker.engine.sequence import Sequence, TokenLogprob
from alchemist_worker.engine.serving_engine import EngineStepFailed, RequestFailed

log = logging.getLogger(__name__)

BatchRun = Callable[[ScheduledBatch], tuple[list[int], list[TokenLogprob | None]]]


@dataclass(frozen=True)
class SequenceResult:
    """One sequence's outcome of an iteration: its next token (and log probabilities), or why it failed."""

    seq: Sequence
    token_id: int = -1
    logprob: TokenLogprob | None = None
    error: Exception | None = None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def run_isolating_faults(run: BatchRun, batch: ScheduledBatch) -> list[SequenceResult]:
    """`run(batch)`, and when it raises, `run` of each sequence alone; one result per sequence, in order."""
    try:
        token_ids, logprobs = run(batch)
    except Exception as exc:
        batch_error = exc
    else:
        return [
            SequenceResult(seq, token_id, logprob)
            for seq, token_id, logprob in zip(batch.seqs, token_ids, logprobs, strict=True)
        ]
    kind = batch.kind.value
    outcomes: list[tuple[Sequence, tuple[int, TokenLogprob | None] | Exception]] = []
    if len(batch.seqs) == 1:
        outcomes.append((batch.seqs[0], batch_error))
    else:
        log.warning(
            "a %s step over %d sequences failed (%s); running each alone to find the culprit",
            kind,
            len(batch.seqs),
            _describe(batch_error),
        )
        for seq in batch.seqs:
            try:
                (token_id,), (logprob,) = run(ScheduledBatch(batch.kind, [seq]))
            except Exception as exc:
                outcomes.append((seq, exc))
            else:
                outcomes.append((seq, (token_id, logprob)))
    blamed = any(not isinstance(outcome, Exception) for _, outcome in outcomes)
    results = []
    for seq, outcome in outcomes:
        if not isinstance(outcome, Exception):
            results.append(SequenceResult(seq, outcome[0], outcome[1]))
            continue
        error: Exception
        if blamed:
            log.error("request %s failed its %s step alone: %s", seq.request_id, kind, _describe(outcome))
            error = RequestFailed(f"generation failed for this request: {_describe(outcome)}")
        else:
            error = EngineStepFailed(
                f"the engine's {kind} step failed for every request in it ({_describe(outcome)}); "
                "retry the request"
            )
        error.__cause__ = outcome
        results.append(SequenceResult(seq, error=error))
    return results
