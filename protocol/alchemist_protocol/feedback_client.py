"""The application-side feedback client: accept, reject or correct a response by its id.

Writes to the job's feedback stream; trainers consume it. Validation happens here too, so an application finds
out at once when it sends something unusable (the trainer would dead-letter it).

Idempotency. Feedback with an `idempotency_key` is written by one Lua script that appends the entry and
remembers the key (its entry id and a digest of the content, for `idempotency_ttl_s`) atomically. A retry under
the same key gets the first entry's id back and adds nothing to the stream; a different feedback under a key
already used raises `IdempotencyConflict` instead of being silently dropped by the trainer's deduplication.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import redis

from alchemist_protocol.keys import JobKeys
from alchemist_protocol.redis_connection import connect
from alchemist_protocol.schemas import Feedback, FeedbackLabel

# Remembered as long as the trainers remember trained feedback ids (ALCHEMIST_FEEDBACK_TRAINED_HORIZON_SECONDS).
DEFAULT_IDEMPOTENCY_TTL_S = 7 * 86_400

# KEYS[1]: the key's hash, KEYS[2]: the stream; ARGV[1]: content digest, ARGV[2]: TTL in ms, ARGV[3..]: fields.
# Returns {entry id, digest stored under the key, 1 if the key was already there else 0}.
_SUBMIT_ONCE = """
local seen = redis.call('HMGET', KEYS[1], 'entry', 'digest')
if seen[1] then
  return {seen[1], seen[2] or '', 1}
end
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
redis.call('HSET', KEYS[1], 'entry', id, 'digest', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {id, ARGV[1], 0}
"""


@dataclass(frozen=True)
class Submitted:
    entry_id: str
    duplicate: bool  # True: an earlier submission under the same idempotency key made this entry


class IdempotencyConflict(ValueError):
    """The idempotency key was already used for different feedback (another label, correction or rating)."""

    def __init__(self, key: str, entry_id: str) -> None:
        super().__init__(
            f"idempotency_key {key!r} was already used for different feedback (entry {entry_id}); "
            "use a new key for new feedback, or resend exactly the first one"
        )
        self.key = key
        self.entry_id = entry_id


def content_digest(feedback: Feedback) -> str:
    """What makes two submissions the same feedback: target, label, correction and rating (not the time)."""
    content = [feedback.request_id, feedback.label.value, feedback.correction, feedback.rating]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class FeedbackClient:
    def __init__(
        self, client: redis.Redis, keys: JobKeys, idempotency_ttl_s: float = DEFAULT_IDEMPOTENCY_TTL_S
    ) -> None:
        if idempotency_ttl_s <= 0:
            raise ValueError(f"idempotency_ttl_s must be positive, got {idempotency_ttl_s}")
        self.client = client
        self.keys = keys
        self.idempotency_ttl_ms = max(1, int(idempotency_ttl_s * 1000))
        self._submit_once = client.register_script(_SUBMIT_ONCE)

    @classmethod
    def from_url(
        cls, url: str, namespace: str, job: str, feedback_stream: str | None = None
    ) -> FeedbackClient:
        """`url`: redis://, rediss:// (TLS; options in the query string, see redis_connection) or unix://."""
        return cls(connect(url), JobKeys(namespace, job, feedback_stream))

    def submit(self, feedback: Feedback) -> Submitted:
        """Appends the feedback, at most once per idempotency key; raises IdempotencyConflict when the key
        was used for different feedback."""
        key = feedback.idempotency_key
        if key is None:
            return Submitted(_text(self.client.xadd(self.keys.feedback, feedback.to_fields())), False)
        digest = content_digest(feedback)
        fields = [part for pair in feedback.to_fields().items() for part in pair]
        entry, stored, seen = self._submit_once(
            keys=[self.keys.feedback_idempotency(key), self.keys.feedback],
            args=[digest, self.idempotency_ttl_ms, *fields],
        )
        if _text(stored) != digest:
            raise IdempotencyConflict(key, _text(entry))
        return Submitted(_text(entry), bool(int(seen)))

    def send(self, feedback: Feedback) -> str:
        """Appends the feedback (once per idempotency key); returns its stream entry id."""
        return self.submit(feedback).entry_id

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
