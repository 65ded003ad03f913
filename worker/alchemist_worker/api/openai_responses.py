"""Response bodies and stream chunks in OpenAI's format, built from engine outputs.

Besides OpenAI's fields, responses carry `alchemist: {"weight_version", "recorded"}` so that an application
knows which model version answered (feedback refers to the response `id`). Clients ignore unknown fields.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from alchemist_worker.engine.sequence import TokenLogprob
from alchemist_worker.engine.serving_engine import PromptTokenizer, RequestOutput


@dataclass
class ResponseMeta:
    """What every chunk and the final body of one response share."""

    id: str
    model: str
    chat: bool
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def extension(out: RequestOutput) -> dict[str, Any]:
    return {"weight_version": out.weight_version, "recorded": out.recorded}


def completion_logprobs(
    logprobs: Sequence[TokenLogprob], tokenizer: PromptTokenizer, offset: int
) -> dict[str, Any]:
    """The legacy completions format: parallel lists of tokens, their log probabilities and top alternatives."""
    tokens = [tokenizer.token_text(lp.token_id) for lp in logprobs]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{tokenizer.token_text(t): v for t, v in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


def chat_logprobs(logprobs: Sequence[TokenLogprob], tokenizer: PromptTokenizer) -> dict[str, Any]:
    def entry(token_id: int, value: float) -> dict[str, Any]:
        text = tokenizer.token_text(token_id)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
            for lp in logprobs
        ]
    }


def full_response(
    meta: ResponseMeta,
    text: str,
    last: RequestOutput,
    logprobs: Sequence[TokenLogprob] | None,
    tokenizer: PromptTokenizer,
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": str(last.finish_reason), "logprobs": None}
    if meta.chat:
        choice["message"] = {"role": "assistant", "content": text}
        if logprobs is not None:
            choice["logprobs"] = chat_logprobs(logprobs, tokenizer)
    else:
        choice["text"] = text
        if logprobs is not None:
            choice["logprobs"] = completion_logprobs(logprobs, tokenizer, 0)
    return {
        "id": meta.id,
        "object": meta.object,
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": f"alchemist-v{last.weight_version}",
        "choices": [choice],
        "usage": usage(last.num_prompt_tokens, last.num_output_tokens),
        "alchemist": extension(last),
    }


def stream_chunk(
    meta: ResponseMeta,
    out: RequestOutput,
    *,
    first: bool,
    logprobs: Sequence[TokenLogprob] | None,
    text_offset: int,
    tokenizer: PromptTokenizer,
) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "finish_reason": str(out.finish_reason) if out.finished else None,
        "logprobs": None,
    }
    if meta.chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if out.new_text or first:
            delta["content"] = out.new_text
        choice["delta"] = delta
        if logprobs:
            choice["logprobs"] = chat_logprobs(logprobs, tokenizer)
    else:
        choice["text"] = out.new_text
        if logprobs:
            choice["logprobs"] = completion_logprobs(logprobs, tokenizer, text_offset)
    chunk: dict[str, Any] = {
        "id": meta.id,
        "object": meta.chunk_object,
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": f"alchemist-v{out.weight_version}",
        "choices": [choice],
    }
    if out.finished:
        chunk["alchemist"] = extension(out)
    return chunk


def usage_chunk(meta: ResponseMeta, last: RequestOutput) -> dict[str, Any]:
    return {
        "id": meta.id,
        "object": meta.chunk_object,
        "created": meta.created,
        "model": meta.model,
        "choices": [],
        "usage": usage(last.num_prompt_tokens, last.num_output_tokens),
    }
