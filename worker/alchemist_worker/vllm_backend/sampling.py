"""What the vLLM engine hands vLLM for a request and takes back: sampling parameters, log probabilities.

vLLM only samples (see engine.py): it gets the request's sampling settings with EOS ignored and no
detokenization, and returns token ids with their log probabilities, which become the API's `TokenLogprob`s.
"""

from __future__ import annotations

from typing import Any

from alchemist_worker.engine.sampling_params import SamplingParams
from alchemist_worker.engine.sequence import TokenLogprob


def vllm_sampling_params(params: SamplingParams, max_tokens: int, record: bool) -> Any:
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VllmSamplingParams(
        n=1,
        max_tokens=max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=max(params.top_k, 0),
        seed=params.seed,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        logprobs=params.logprobs,
        ignore_eos=True,  # end of sequence and stops are decided by the engine (see the module docstring)
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
        skip_reading_prefix_cache=record,  # a record must cover the prompt from its first token
    )


def token_logprobs(token_ids: list[int], logprobs: Any, wanted: int | None) -> list[TokenLogprob]:
    if wanted is None or not logprobs:
        return []
    out = []
    for token_id, entries in zip(token_ids, logprobs, strict=False):
        top = sorted(
            ((tid, lp) for tid, lp in entries.items() if lp.rank is not None), key=lambda e: e[1].rank
        )
        out.append(
            TokenLogprob(
                token_id=token_id,
                logprob=float(entries[token_id].logprob),
                top=[(tid, float(lp.logprob)) for tid, lp in top[:wanted]],
            )
        )
    return out
