"""The application-side feedback client: accept, reject or correct a response by its id.

Writes to the job's feedback stream; trainers consume it. Validation happens here too, so an application finds
out at once when it sends something unusable (the trainer would dead-letter it).
"""

from __future__ import annotations

import redis

from alchemist_protocol.keys import JobKeys
from alchemist_protocol.redis_connection import connect
from alchemist_protocol.schemas import Feedback, FeedbackLabel


class FeedbackClient:
    def __init__(self, client: redis.Redis, keys: JobKeys) -> None:
        self.client = client
        self.keys = keys

    @classmethod
    def from_url(
        cls, url: str, namespace: str, job: str, feedback_stream: str | None = None
    ) -> FeedbackClient:
        """`url`: redis://, rediss:// (TLS; options in the query string, see redis_connection) or unix://."""
        return cls(connect(url), JobKeys(namespace, job, feedback_stream))

    def send(self, feedback: Feedback) -> str:
        """Appends the feedback; returns its stream entry id."""
        return str(self.client.xadd(self.keys.feedback, feedback.to_fields()))

    def accept(
        self, response_id: str, *, rating: float | None = None, idempotency_key: str | None = None
    ) -> str:
        return self.send(
            Feedback(
                request_id=response_id,
                label=FeedbackLabel.POSITIVE,
                rating=rating,
                idempotency_key=idempotency_key,
            )
        )

    def reject(
        self, response_id: str, *, rating: float | None = None, idempotency_key: str | None = None
    ) -> str:
        return self.send(
            Feedback(
                request_id=response_id,
                label=FeedbackLabel.NEGATIVE,
                rating=rating,
                idempotency_key=idempotency_key,
            )
        )

    def correct(self, response_id: str, correction: str, *, idempotency_key: str | None = None) -> str:
        return self.send(
            Feedback(
                request_id=response_id,
                label=FeedbackLabel.CORRECTION,
                correction=correction,
                idempotency_key=idempotency_key,
            )
        )
