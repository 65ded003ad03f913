"""POST /v1/feedback on the worker's API: applications accept, reject or correct a response by its id.

The route writes to the same Redis stream as the Python client (`alchemist_protocol.feedback_client`), after
the same validation, so a bad request gets a 400 at once instead of a dead letter later. It answers 202: the
feedback is queued, and trained at the next step. When the stream's backlog exceeds `max_backlog` it answers
429 with Retry-After, so applications slow down instead of growing Redis without bound.

    POST /v1/feedback
    {"response_id": "chatcmpl-...", "label": "correction", "correction": "Paris.", "idempotency_key": "..."}
    -> 202 {"object": "feedback", "id": "<stream entry id>", "response_id": ..., "label": ..., "status": "queued"}

`label` is positive / negative / correction (accept / reject / correct are accepted as synonyms).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis
from alchemist_protocol.feedback_client import FeedbackClient
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.schemas import Feedback
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from alchemist_worker.api.errors import APIError, bad_request, unavailable

SYNONYMS = {"accept": "positive", "accepted": "positive", "reject": "negative", "rejected": "negative"}
SYNONYMS |= {"correct": "correction", "corrected": "correction"}


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


def _known(store: JobStore, request_id: str, grace_s: float) -> bool:
    deadline = time.monotonic() + grace_s
    while store.get_request(request_id) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def feedback_router(
    client: FeedbackClient,
    store: JobStore | None = None,
    *,
    max_backlog: int = 0,
    backlog: Callable[[], int] | None = None,
    record_grace_s: float = 2.0,
) -> APIRouter:
    """The route. With `store`, feedback for a response id this job never served (or whose request record
    expired) gets a 404; a record is waited for up to `record_grace_s`, since a replica writes it just after
    the response (an application may be faster). `backlog` returns the unacknowledged entries (the trainer's
    lag) for the 429 bound; 0 disables it."""
    router = APIRouter()

    @router.post("/v1/feedback", status_code=202)
    def post_feedback(body: FeedbackBody) -> JSONResponse:  # sync: runs in the threadpool, Redis is blocking
        feedback = body.to_feedback()
        try:
            if max_backlog > 0 and backlog is not None and (waiting := backlog()) >= max_backlog:
                error = APIError(
                    429,
                    f"feedback backlog is {waiting} entries (limit {max_backlog}); retry later",
                    type="rate_limit_error",
                    code="feedback_backlog",
                )
                return JSONResponse(error.body(), status_code=429, headers={"Retry-After": "5"})
            if store is not None and not _known(store, feedback.request_id, record_grace_s):
                raise APIError(
                    404,
                    f"no served response with id {feedback.request_id!r} (unknown, or its record expired)",
                    param="response_id",
                    code="response_not_found",
                )
            entry_id = client.send(feedback)
        except redis.RedisError as exc:
            raise unavailable(f"the feedback queue is unreachable: {exc}") from None
        payload: dict[str, Any] = {
            "object": "feedback",
            "id": entry_id,
            "response_id": feedback.request_id,
            "label": feedback.label.value,
            "status": "queued",
        }
        return JSONResponse(payload, status_code=202)

    return router
