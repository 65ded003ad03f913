"""Every Redis key name of a job, in one place.

All keys of a job share the prefix `alchemist:{namespace}:{job}:`, so one Redis can serve many jobs and a job's
keys can be listed or deleted together. Worker, operator and applications all build names here.
"""

from __future__ import annotations

from dataclasses import dataclass

FEEDBACK_GROUP = "trainers"


@dataclass(frozen=True)
class JobKeys:
    namespace: str
    job: str
    # The job's spec may name its own feedback stream (an application's existing stream, say).
    feedback_stream: str | None = None

    def __post_init__(self) -> None:
        for field, value in (("namespace", self.namespace), ("job", self.job)):
            if not value or ":" in value or any(c.isspace() for c in value):
                raise ValueError(f"{field} must be a non-empty name without ':' or whitespace, got {value!r}")
        stream = self.feedback_stream
        if stream is not None and (not stream or any(c.isspace() for c in stream)):
            raise ValueError(f"feedback_stream must be a non-empty key without whitespace, got {stream!r}")

    @property
    def prefix(self) -> str:
        return f"alchemist:{self.namespace}:{self.job}:"

    @property
    def feedback(self) -> str:
        """Stream written by applications (XADD), read by trainers through the FEEDBACK_GROUP consumer group."""
        return self.feedback_stream or self.prefix + "feedback"

    @property
    def dead_letters(self) -> str:
        """Stream of feedback entries that failed validation, with the reason and the original fields."""
        return self.prefix + "feedback:dead"

    def feedback_idempotency(self, key: str) -> str:
        """Hash of one idempotency key: the stream entry its first submission made and a digest of its content
        (with a TTL), so a retry gets that entry back and a different feedback under the same key a conflict."""
        return self.prefix + f"feedback:idempotency:{key}"

    @property
    def trained_feedback(self) -> str:
        """Set of feedback ids already trained on: makes training idempotent under redelivery."""
        return self.prefix + "feedback:trained"

    def request(self, request_id: str) -> str:
        """A served request's tokens, replica and version (JSON, with a TTL), for recomputation anywhere."""
        return self.prefix + f"request:{request_id}"

    @property
    def versions(self) -> str:
        """Sorted set of published version numbers (score = version)."""
        return self.prefix + "versions"

    def version(self, number: int) -> str:
        """JSON metadata of one published version."""
        return self.prefix + f"version:{number}"

    @property
    def version_events(self) -> str:
        """Stream with one entry per published version, so the operator can react without polling."""
        return self.prefix + "versions:events"

    @property
    def replicas(self) -> str:
        """Set of replica names that have ever reported."""
        return self.prefix + "replicas"

    def replica(self, name: str) -> str:
        """JSON state of one replica (loaded version, heartbeat time); expires when heartbeats stop."""
        return self.prefix + f"replica:{name}"

    @property
    def rollout(self) -> str:
        """JSON rollout pointer: which version each replica must serve. Written by the operator only."""
        return self.prefix + "rollout"

    def version_feedback(self, number: int) -> str:
        """Hash of per-version feedback counters (label -> count), for canary gates."""
        return self.prefix + f"version:{number}:feedback"

    @property
    def trainer_lease(self) -> str:
        """Fencing token of the trainer (`holder/epoch/nonce`), the right to publish versions; has a TTL."""
        return self.prefix + "trainer:lease"

    @property
    def trainer_epoch(self) -> str:
        """Counter bumped at every lease acquisition: the fencing epoch a commit must still hold (no TTL)."""
        return self.prefix + "trainer:epoch"

    @property
    def live_settings(self) -> str:
        """JSON settings the workers apply without a restart (training hyper-parameters). Written by the operator."""
        return self.prefix + "settings"

    @property
    def training_group(self) -> str:
        """JSON of the data-parallel training group: generation, members in rank order, rendezvous endpoint.
        Written only under the trainer lease's fencing token (alchemist_protocol.training_group)."""
        return self.prefix + "group"

    @property
    def training_group_generation(self) -> str:
        """Counter bumped at every new generation of the training group (no TTL)."""
        return self.prefix + "group:generation"

    @property
    def training_group_candidates(self) -> str:
        """Set of replica names that ever offered to train in the group."""
        return self.prefix + "group:candidates"

    def training_group_member(self, name: str) -> str:
        """JSON of one replica's offer to train (its generation, whether it waits for a new one); has a TTL."""
        return self.prefix + f"group:member:{name}"

    @property
    def rollback(self) -> str:
        """JSON rollback request: the trainer continues from that version and `latest` serving returns to it."""
        return self.prefix + "rollback"
