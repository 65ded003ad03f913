"""Operator-facing and evaluation routes of the continual trainer, mounted on the worker's API.

GET  /v1/versions            published versions (from Redis) with their evaluation gate readings, those the
                             gate held back (`held`), the one served here, the trainer's state
POST /v1/versions/rollback   {"version": k, "reason": "..."}: continue training from k; `latest`-following
                             replicas serve k until the trainer publishes past it (an operator-managed
                             job also moves its rollout pointer)
POST /v1/score               {"prompt": "...", or "messages": [...], "continuation": "..."}: the summed
                             log-probability of the continuation under the version served right now
                             (teacher forcing), e.g. to see a corrected answer become more likely;
                             messages are checked as chat completions checks them (a known role each,
                             at least one), and bad text or a conversation the template rejects is a 400

The score is engine work in slices between serving iterations (scoring.py); prompt + continuation must fit
the context (400 `context_length_exceeded` otherwise), tokenization runs off the event loop, and the handler
waits for the score without holding a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any

import redis
from alchemist_protocol.job_store import JobStore
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from alchemist_worker.api.errors import APIError, bad_request, unavailable
from alchemist_worker.api.openai_schemas import ChatMessage
from alchemist_worker.api.text_validity import reject_invalid_text
from alchemist_worker.continual.scoring import ScoreQueueFull

# (prompt ids, continuation ids) -> the future (logprob, version) of a queued score.
Scorer = Callable[[list[int], list[int]], Future[tuple[float, int]]]
# Runs a function off the event loop and awaits its result (the server's tokenizer pool).
Offload = Callable[[Callable[[], Any]], Awaitable[Any]]
SCORE_TIMEOUT_S = 120.0


async def _threadpool(fn: Callable[[], Any]) -> Any:
    return await run_in_threadpool(fn)


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=0)
    reason: str = ""


class ScoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    continuation: str = Field(min_length=1)


def continual_router(
    store: JobStore,
    status: Callable[[], dict[str, Any]],
    scorer: Scorer,
    encode_prompt: Callable[[str], list[int]],
    encode_chat: Callable[[list[dict[str, str]]], list[int]],
    encode_continuation: Callable[[str], list[int]],
    *,
    max_model_len: int | None = None,
    offload: Offload | None = None,
) -> APIRouter:
    """`max_model_len`: the most prompt + continuation tokens a score may have."""
    router = APIRouter()
    run_off_loop = offload or _threadpool

    @router.get("/v1/versions")
    def list_versions() -> dict[str, Any]:
        try:
            numbers = store.version_numbers()
            infos = [store.get_version(n) for n in numbers]
            rollback = store.get_rollback()
        except redis.RedisError as exc:
            raise unavailable(f"Redis is unreachable: {exc}") from None
        return {
            "object": "list",
            "data": [info.model_dump(mode="json") for info in infos if info is not None],
            "held": [
                info.version for info in infos if info is not None and info.held
            ],  # by the evaluation gate
            "rollback": None if rollback is None else rollback.model_dump(mode="json"),
            "worker": status(),
        }

    @router.post("/v1/versions/rollback", status_code=202)
    def rollback(body: RollbackBody) -> dict[str, Any]:
        try:
            request = store.request_rollback(body.version, body.reason)
        except ValueError as exc:
            raise bad_request(str(exc), "version") from None
        except redis.RedisError as exc:
            raise unavailable(f"Redis is unreachable: {exc}") from None
        return {"object": "rollback", **request.model_dump(mode="json")}

    def encode(body: ScoreBody) -> tuple[list[int], list[int]]:  # off the event loop: texts can be megabytes
        reject_invalid_text(body)
        if body.prompt is not None:
            prompt = encode_prompt(body.prompt)
        else:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages or []]
            try:
                prompt = encode_chat(messages)
            except Exception as exc:  # a template may reject a conversation (raise_exception)
                raise bad_request(f"the chat template rejected these messages: {exc}", "messages") from exc
        return prompt, encode_continuation(body.continuation)

    @router.post("/v1/score")
    async def score(body: ScoreBody) -> dict[str, Any]:
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of 'prompt' and 'messages'", "prompt")
        prompt, continuation = await run_off_loop(lambda: encode(body))
        if not prompt or not continuation:
            raise bad_request("prompt and continuation must each hold at least one token", "continuation")
        if max_model_len is not None and len(prompt) + len(continuation) > max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {max_model_len} tokens; the score has "
                f"{len(prompt)} prompt and {len(continuation)} continuation tokens. Shorten them.",
                param="continuation",
                code="context_length_exceeded",
            )
        try:
            pending = scorer(prompt, continuation)
        except ScoreQueueFull as exc:
            raise APIError(429, f"too many scores in progress: {exc}", type="rate_limit_error") from None
        try:
            logprob, version = await asyncio.wait_for(asyncio.wrap_future(pending), SCORE_TIMEOUT_S)
        except TimeoutError:
            raise unavailable(f"the score did not finish within {SCORE_TIMEOUT_S:g} s") from None
        finally:
            pending.cancel()  # a client that left, or a timeout: abandon the work (no-op once it finished)
        return {
            "object": "score",
            "logprob": logprob,
            "tokens": len(continuation),
            "mean_logprob": logprob / len(continuation),
            "version": version,
        }

    return router
