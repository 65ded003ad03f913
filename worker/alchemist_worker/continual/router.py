"""Operator-facing and evaluation routes of the continual trainer, mounted on the worker's API.

GET  /v1/versions            published versions (from Redis), the one served here, the trainer's state
POST /v1/versions/rollback   {"version": k, "reason": "..."}: continue training from k; `latest`-following
                             replicas serve k until the trainer publishes past it (an operator-managed
                             job also moves its rollout pointer)
POST /v1/score               {"prompt": "...", or "messages": [...], "continuation": "..."}: the summed
                             log-probability of the continuation under the version served right now
                             (teacher forcing), e.g. to see a corrected answer become more likely
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from alchemist_protocol.job_store import JobStore
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from alchemist_worker.api.errors import bad_request, unavailable

Scorer = Callable[
    [list[int], list[int]], tuple[float, int]
]  # (prompt ids, continuation ids) -> (logprob, version)


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=0)
    reason: str = ""


class ScoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    continuation: str = Field(min_length=1)


def continual_router(
    store: JobStore,
    status: Callable[[], dict[str, Any]],
    scorer: Scorer,
    encode_prompt: Callable[[str], list[int]],
    encode_chat: Callable[[list[dict[str, str]]], list[int]],
    encode_continuation: Callable[[str], list[int]],
) -> APIRouter:
    router = APIRouter()

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

    @router.post("/v1/score")
    def score(body: ScoreBody) -> dict[str, Any]:
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of 'prompt' and 'messages'", "prompt")
        prompt = encode_prompt(body.prompt) if body.prompt is not None else encode_chat(body.messages or [])
        continuation = encode_continuation(body.continuation)
        if not prompt or not continuation:
            raise bad_request("prompt and continuation must each hold at least one token", "continuation")
        logprob, version = scorer(prompt, continuation)
        return {
            "object": "score",
            "logprob": logprob,
            "tokens": len(continuation),
            "mean_logprob": logprob / len(continuation),
            "version": version,
        }

    return router
