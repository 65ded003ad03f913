"""The rules every engine applies to a request in the same way, so the API behaves alike whichever serves.

Which prompts an engine accepts, when generation stops (end of sequence, a stop token id, a stop string, the
length limits), and how observers hear of a finished request. The native engine and the vLLM engine both call
these; vLLM itself only samples.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Sequence

from alchemist_worker.engine.detokenizer import IncrementalDetokenizer
from alchemist_worker.engine.sampling_params import SamplingParams
from alchemist_worker.engine.sequence import FinishReason
from alchemist_worker.engine.serving_engine import FinishedRequest, FinishedRequestObserver

log = logging.getLogger(__name__)


def check_prompt(prompt: Sequence[int], params: SamplingParams, max_model_len: int, vocab_size: int) -> None:
    """Raises ValueError (a 400 at the API) for a request no engine can run."""
    if not prompt:
        raise ValueError("the prompt is empty: it must hold at least one token")
    if len(prompt) >= max_model_len:
        raise ValueError(
            f"the prompt has {len(prompt)} tokens; this model's context is {max_model_len} tokens "
            "and at least one must be left to generate"
        )
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    if params.top_k > vocab_size:
        raise ValueError(f"top_k {params.top_k} is larger than the vocabulary ({vocab_size} tokens)")


def stop_reason(
    token_id: int,
    params: SamplingParams,
    eos_token_ids: Collection[int],
    detokenizer: IncrementalDetokenizer,
    *,
    num_output_tokens: int,
    num_tokens: int,
    max_model_len: int,
) -> FinishReason | None:
    """Takes one generated token (already counted in the totals); why generation ends with it, if it does.

    A stop token's text is not part of the output; every other token goes to the detokenizer, which watches
    for stop strings.
    """
    if (not params.ignore_eos and token_id in eos_token_ids) or token_id in params.stop_token_ids:
        return FinishReason.STOP
    detokenizer.push(token_id)
    if detokenizer.stopped_by is not None:
        return FinishReason.STOP
    if num_output_tokens >= params.max_tokens or num_tokens >= max_model_len:
        return FinishReason.LENGTH
    return None


def notify_finished(observers: Iterable[FinishedRequestObserver], finished: FinishedRequest) -> None:
    for observer in observers:
        try:
            observer(finished)
        except Exception:  # an observer must never break serving
            log.exception("finished-request observer failed for %s", finished.request_id)
