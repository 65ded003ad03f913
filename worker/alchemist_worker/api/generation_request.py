"""From an OpenAI request body to the engine's `GenerationRequest`: prompt tokens, limits and sampling.

Every rejection is an `APIError` with status 400 and the offending parameter, raised before the engine sees
the request. A prompt that leaves no room to generate, or asks for more tokens than the context holds, is
rejected with code `context_length_exceeded`, as OpenAI does. Every sampling parameter is range-checked
here (SamplingParams, plus the bounds that need the vocabulary), because a value that only failed inside the
engine's iteration would fail it for every request batched with it.
"""

from __future__ import annotations

import uuid

from alchemist_worker.api.errors import APIError, bad_request
from alchemist_worker.api.openai_schemas import ChatCompletionRequest, CompletionRequest
from alchemist_worker.api.text_validity import reject_invalid_text
from alchemist_worker.engine.sampling_params import InvalidParameter, SamplingParams
from alchemist_worker.engine.serving_engine import GenerationRequest, PromptTokenizer


def new_response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def reject_unsupported(body: CompletionRequest | ChatCompletionRequest) -> None:
    if body.n != 1:
        raise bad_request(f"n must be 1 (one choice per request), got {body.n}", param="n")
    if body.logit_bias:
        raise bad_request("logit_bias is not supported", param="logit_bias")
    if isinstance(body, CompletionRequest):
        if body.echo:
            raise bad_request("echo is not supported", param="echo")
        if body.suffix:
            raise bad_request("suffix is not supported", param="suffix")
        if body.best_of not in (None, 1):
            raise bad_request("best_of must be 1", param="best_of")
    else:
        if body.tools:
            raise bad_request("tools are not supported by this server", param="tools")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise bad_request("only response_format {'type': 'text'} is supported", param="response_format")
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs to be true", param="top_logprobs")
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed with stream=true", param="stream_options")


def completion_prompt(body: CompletionRequest, tokenizer: PromptTokenizer, vocab_size: int) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise bad_request(
                f"one prompt per request is supported, got a batch of {len(prompt)}", param="prompt"
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    else:
        ids = [t for t in prompt if isinstance(t, int)]
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise bad_request(f"prompt token ids {bad[:5]} are outside [0, {vocab_size})", param="prompt")
    if not ids:
        raise bad_request("the prompt is empty", param="prompt")
    return ids


def chat_prompt(body: ChatCompletionRequest, tokenizer: PromptTokenizer) -> list[int]:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        return tokenizer.apply_chat_template(messages)
    except Exception as exc:  # a template may reject a conversation (raise_exception) or lack a variable
        raise bad_request(f"the chat template rejected these messages: {exc}", param="messages") from exc


def _max_tokens(requested: int | None, prompt_len: int, max_model_len: int) -> int:
    room = max_model_len - prompt_len
    if room < 1 or (requested is not None and requested > room):
        wanted = f" + {requested} to generate" if requested is not None else ""
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens; the request has "
            f"{prompt_len} prompt tokens{wanted}. Shorten the prompt or lower max_tokens.",
            param="messages" if requested is None else "max_tokens",
            code="context_length_exceeded",
        )
    return room if requested is None else requested


def _check_vocabulary_bounds(body: CompletionRequest | ChatCompletionRequest, vocab_size: int) -> None:
    if body.top_k > vocab_size:
        raise bad_request(
            f"top_k must be at most the vocabulary size {vocab_size} (or -1/0 for no cut), got {body.top_k}",
            param="top_k",
        )
    bad = [t for t in body.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"stop_token_ids {bad[:5]} are outside [0, {vocab_size})", param="stop_token_ids")


def sampling_params(
    body: CompletionRequest | ChatCompletionRequest, prompt_len: int, max_model_len: int, vocab_size: int
) -> SamplingParams:
    _check_vocabulary_bounds(body, vocab_size)
    limit_param = "max_tokens"
    if isinstance(body, ChatCompletionRequest):
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if body.max_completion_tokens is not None:
            limit_param = "max_completion_tokens"
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        requested, logprobs = body.max_tokens, body.logprobs
    if requested is not None and requested < 1:
        raise bad_request(f"{limit_param} must be at least 1, got {requested}", param=limit_param)
    try:
        return SamplingParams(
            max_tokens=_max_tokens(requested, prompt_len, max_model_len),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=body.stop_strings(),
            stop_token_ids=tuple(body.stop_token_ids),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
        )
    except InvalidParameter as exc:
        chat_logprobs = exc.param == "logprobs" and isinstance(body, ChatCompletionRequest)
        raise bad_request(str(exc), param="top_logprobs" if chat_logprobs else exc.param) from exc


def build_generation_request(
    body: CompletionRequest | ChatCompletionRequest,
    tokenizer: PromptTokenizer,
    *,
    vocab_size: int,
    max_model_len: int,
    response_id: str,
) -> GenerationRequest:
    reject_invalid_text(body)
    reject_unsupported(body)
    if isinstance(body, CompletionRequest):
        prompt = completion_prompt(body, tokenizer, vocab_size)
    else:
        prompt = chat_prompt(body, tokenizer)
    params = sampling_params(body, len(prompt), max_model_len, vocab_size)
    return GenerationRequest(
        request_id=response_id, prompt_token_ids=prompt, params=params, record=body.record
    )
