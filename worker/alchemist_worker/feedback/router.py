"""POST /v1/feedback on the worker's API: applications accept, reject or correct a response by its id.

The route writes to the same Redis stream as the Python client (`alchemist_protocol.feedback_client`), after
the same validation, so a bad request gets a 400 at once instead of a dead letter later. It answers 202: the
feedback is queued, and trained at the next step. When the stream's backlog exceeds `max_backlog` it answers
429 with Retry-After, so applications slow down instead of growing Redis without bound.

    POST /v1/feedback
    {"response_id": "chatcmpl-...", "label": "correction", "correction": "Paris.", "idempotency_key": "..."}
    -> 202 {"object": "feedback", "id": "<stream entry id>", "response_id": ..., "label": ..., "status": "queued"}

`label` is positive / negative / correction (accept / reject / correct are accepted as synonyms).

Idempotent: a retry with the same `idempotency_key` answers 200 with the first submission's entry id
(`"duplicate": true`) and queues nothing; different feedback under a used key is a 409. A correction whose
training sample could never fit a step is a 400 here rather than a dead letter later. No handler blocks the
event loop: Redis calls run in the thread pool and the wait for a request record is an async sleep.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis
from alchemist_protocol.feedback_client import FeedbackClient, IdempotencyConflict
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.schemas import Feedback, FeedbackLabel, RequestRecord
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from alchemist_worker.api.errors import APIError, bad_request, unavailable

SYNONYMS = {"accept": "positive", "accepted": "positive", "reject": "negative", "rejected": "negative"}
SYNONYMS |= {"correct": "correction", "corrected": "correction"}
RECORD_POLL_S = 0.05


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    response_id: str | None = Field(default=None, description="the id the completion returned")
    request_id: str | None = Field(default=None, description="synonym of response_id")
    label: str
    correction: str | None = None
    rating: float | None = None
    idempotency_key: str | None = None

    def to_feedback(self) -> Feedback:
        target = self.response_id or self.request_id
        if not target:
            raise bad_request(
                "response_id is required: the id of the completion this feedback is about", "response_id"
            )
        label = SYNONYMS.get(self.label.strip().lower(), self.label.strip().lower())
        try:
            fields: dict[str, Any] = {"request_id": target, "label": label, "correction": self.correction}
            fields |= {"rating": self.rating, "idempotency_key": self.idempotency_key}
            return Feedback.model_validate(fields)
        except ValidationError as exc:
            err = exc.errors()[0]
            param = ".".join(str(p) for p in err["loc"]) or None
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
            )
            raise bad_request(problems, param) from None


async def _request_record(store: JobStore, request_id: str, grace_s: float) -> RequestRecord | None:
    """The request's record, waited for up to `grace_s` without holding a thread (the lookups run in the
    thread pool, the waits on the event loop)."""
    deadline = time.monotonic() + grace_s
    while True:
        record = await run_in_threadpool(store.get_request, request_id)
        if record is not None or time.monotonic() >= deadline:
            return record
        await asyncio.sleep(RECORD_POLL_S)


def _too_long(feedback: Feedback, tokens: int, limit: int) -> APIError:
    what = (
        "the prompt and the correction" if feedback.correction is not None else "the prompt and the response"
    )
    return APIError(
        400,
        f"{what} make a training sample of {tokens} tokens; a sample may hold at most {limit} (the context "
        "length, and ALCHEMIST_TRAINING_BATCH_TOKENS), so this feedback could never be trained on. "
        "Send a shorter correction.",
        param="correction" if feedback.correction is not None else "response_id",
        code="sample_too_long",
    )


async def _threadpool(fn: Callable[[], Any]) -> Any:
    return await run_in_threadpool(fn)


def feedback_router(
    client: FeedbackClient,
    store: JobStore | None = None,
    *,
    max_backlog: int = 0,
    backlog: Callable[[], int] | None = None,
    record_grace_s: float = 2.0,
    sample_tokens: Callable[[RequestRecord, Feedback], int] | None = None,
    max_sample_tokens: int = 0,
    offload: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None,
) -> APIRouter:
    """The route. With `store`, feedback for a response id this job never served (or whose request record
    expired) gets a 404; a record is waited for up to `record_grace_s`, since a replica writes it just after
    the response (an application may be faster). `backlog` returns the unacknowledged entries (the trainer's
    lag) for the 429 bound; 0 disables it. `sample_tokens` counts the training sample the feedback would make
    (tokenizing a correction, through `offload`); beyond `max_sample_tokens` it is refused with 400 at once
    instead of being dead-lettered later."""
    router = APIRouter()
    run_off_loop = offload or _threadpool

    async def check_fits(feedback: Feedback, record: RequestRecord) -> None:
        if sample_tokens is None or max_sample_tokens <= 0 or feedback.label is FeedbackLabel.NEGATIVE:
            return  # a rejection trains nothing
        tokens = await run_off_loop(lambda: sample_tokens(record, feedback))
        if tokens > max_sample_tokens:
            raise _too_long(feedback, tokens, max_sample_tokens)

    @router.post("/v1/feedback", status_code=202)
    async def post_feedback(body: FeedbackBody) -> JSONResponse:
        feedback = body.to_feedback()
        try:
            if max_backlog > 0 and backlog is not None:
                waiting = await run_in_threadpool(backlog)
                if waiting >= max_backlog:
                    error = APIError(
                        429,
                        f"feedback backlog is {waiting} entries (limit {max_backlog}); retry later",
                        type="rate_limit_error",
                        code="feedback_backlog",
                    )
                    return JSONResponse(error.body(), status_code=429, headers={"Retry-After": "5"})
            if store is not None:
                record = await _request_record(store, feedback.request_id, record_grace_s)
                if record is None:
                    raise APIError(
                        404,
                        f"no served response with id {feedback.request_id!r} (unknown, or its record expired)",
                        param="response_id",
                        code="response_not_found",
                    )
                await check_fits(feedback, record)
            submitted = await run_in_threadpool(client.submit, feedback)
        except IdempotencyConflict as exc:
            raise APIError(409, str(exc), param="idempotency_key", code="idempotency_conflict") from None
        except redis.RedisError as exc:
            raise unavailable(f"the feedback queue is unreachable: {exc}") from None
        payload: dict[str, Any] = {
            "object": "feedback",
            "id": submitted.entry_id,
            "response_id": feedback.request_id,
            "label": feedback.label.value,
            "status": "queued",
            "duplicate": submitted.duplicate,
        }
        # A retry under the same idempotency key: the first submission's entry, nothing new queued.
        return JSONResponse(payload, status_code=200 if submitted.duplicate else 202)

    return router
