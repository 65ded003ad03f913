"""Reads and writes of a job's shared state in Redis (requests, versions, replicas, rollout pointer).

Keys come from `JobKeys`, payloads from `schemas`; this is the only place that turns one into the other.
Synchronous on purpose: callers in async code (the operator) run it in a thread.
"""

from __future__ import annotations

import enum
from typing import Any

import redis

from alchemist_protocol.feedback_stream import FeedbackLag, feedback_lag
from alchemist_protocol.keys import FEEDBACK_GROUP, JobKeys
from alchemist_protocol.redis_connection import bytes_twin, connect
from alchemist_protocol.schemas import (
    FeedbackLabel,
    ReplicaState,
    RequestRecord,
    RollbackRequest,
    RolloutPointer,
    VersionInfo,
)


class VersionCommit(enum.StrEnum):
    """What the fenced commit of a version did."""

    COMMITTED = "committed"  # published now, or by an earlier attempt of this very commit (same metadata)
    FENCED = "fenced"  # the committer's lease token is no longer the current one: another trainer took over
    TAKEN = "taken"  # another commit published this version number
    MOVED = "moved"  # the head is not the one the committer built on (a newer version, or a gap)


# KEYS: version metadata, versions index, version events, trainer lease.
# ARGV: version, metadata JSON, parent, fencing token ('' = unfenced), expected head ('' = any lower head).
# One script, so the fence, the head check and the three writes are one atomic step: a trainer whose lease was
# taken over cannot publish, even if it was paused between its check and its write.
_COMMIT_VERSION = """
local existing = redis.call('GET', KEYS[1])
if existing and existing == ARGV[2] then return 'committed' end
if ARGV[4] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[4] then return 'fenced' end
if existing then return 'taken' end
local version = tonumber(ARGV[1])
local top = redis.call('ZREVRANGE', KEYS[2], 0, 0)
local head = 0
if top[1] then head = tonumber(top[1]) end
if ARGV[5] ~= '' then
  if head ~= tonumber(ARGV[5]) then return 'moved' end
elseif head >= version then
  return 'moved'
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], version, ARGV[1])
redis.call('XADD', KEYS[3], '*', 'version', ARGV[1], 'parent', ARGV[3])
return 'committed'
"""


class JobStore:
    def __init__(self, client: redis.Redis, keys: JobKeys) -> None:
        self.client = client
        self.keys = keys
        self._commit_version = client.register_script(_COMMIT_VERSION)
        self._stream_client: redis.Redis | None = None

    @classmethod
    def from_url(cls, url: str, namespace: str, job: str, feedback_stream: str | None = None) -> JobStore:
        """`url`: redis://, rediss:// (TLS; options in the query string, see redis_connection) or unix://."""
        return cls(connect(url), JobKeys(namespace, job, feedback_stream))

    @property
    def stream_client(self) -> redis.Redis:
        """The same server through a client whose replies are bytes: for reading stream entries, which
        applications write and which may hold anything (see redis_connection). Created on first use."""
        if self._stream_client is None:
            self._stream_client = bytes_twin(self.client)
        return self._stream_client

    def feedback_lag(self) -> FeedbackLag:
        """Feedback entries the trainers have not acknowledged yet, and the age of the oldest."""
        return feedback_lag(self.stream_client, self.keys.feedback, FEEDBACK_GROUP)

    def close(self) -> None:
        self.client.close()
        if self._stream_client is not None:
            self._stream_client.close()

    # Requests: what any replica needs to recompute a sample.
    def put_request(self, record: RequestRecord, ttl_seconds: int) -> None:
        self.client.set(self.keys.request(record.request_id), record.model_dump_json(), ex=ttl_seconds)

    def get_request(self, request_id: str) -> RequestRecord | None:
        raw = self.client.get(self.keys.request(request_id))
        return None if raw is None else RequestRecord.model_validate_json(raw)

    # Versions.
    def publish_version(self, info: VersionInfo) -> None:
        """Metadata, index and event in one transaction: readers never see half a version."""
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.keys.version(info.version), info.model_dump_json())
        pipe.zadd(self.keys.versions, {str(info.version): info.version})
        pipe.xadd(self.keys.version_events, {"version": str(info.version), "parent": str(info.parent)})
        pipe.execute()

    def commit_version(
        self, info: VersionInfo, fence: str | None, expected_head: int | None = None
    ) -> VersionCommit:
        """Publishes `info` only while `fence` is the trainer lease's token and the head is as expected.

        `expected_head` None accepts any head below the version (rebuilding the index after a Redis loss).
        Idempotent: retrying a commit whose reply was lost answers COMMITTED again and writes nothing.
        """
        outcome = self._commit_version(
            keys=[self.keys.version(info.version), self.keys.versions, self.keys.version_events,
                  self.keys.trainer_lease],
            args=[info.version, info.model_dump_json(), info.parent, fence or "",
                  "" if expected_head is None else expected_head],
        )  # fmt: skip
        return VersionCommit(outcome.decode() if isinstance(outcome, bytes) else str(outcome))

    def holds_fence(self, fence: str) -> bool:
        """Whether `fence` is still the trainer lease's token (checked again, atomically, by the commit)."""
        value = self.client.get(self.keys.trainer_lease)
        return (value.decode() if isinstance(value, bytes) else value) == fence

    def get_version(self, number: int) -> VersionInfo | None:
        raw = self.client.get(self.keys.version(number))
        return None if raw is None else VersionInfo.model_validate_json(raw)

    def latest_version(self) -> int:
        """Highest published version, 0 (the base model) when none."""
        top = self.client.zrevrange(self.keys.versions, 0, 0)
        return int(top[0]) if top else 0

    def version_numbers(self) -> list[int]:
        return [int(v) for v in self.client.zrange(self.keys.versions, 0, -1)]

    def latest_servable_version(self) -> int:
        """The newest published version the evaluation gate did not hold back; 0 (the base model) when none."""
        for number in reversed(self.version_numbers()):
            info = self.get_version(number)
            if info is not None and not info.held:
                return number
        return 0

    def held_versions(self, above: int = 0) -> dict[int, VersionInfo]:
        """Published versions above `above` that the evaluation gate holds back, by number."""
        numbers = [int(v) for v in self.client.zrangebyscore(self.keys.versions, f"({above}", "+inf")]
        infos = [self.get_version(n) for n in numbers]
        return {info.version: info for info in infos if info is not None and info.held}

    def forget_version(self, number: int) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.keys.version(number), self.keys.version_feedback(number))
        pipe.zrem(self.keys.versions, str(number))
        pipe.execute()

    # Per-version feedback counters, for canary gates.
    def count_feedback(self, version: int, label: FeedbackLabel) -> None:
        self.client.hincrby(self.keys.version_feedback(version), label.value, 1)

    def feedback_counts(self, version: int) -> dict[FeedbackLabel, int]:
        raw: dict[str, Any] = self.client.hgetall(self.keys.version_feedback(version))
        return {label: int(raw.get(label.value, 0)) for label in FeedbackLabel}

    # Replicas.
    def report_replica(self, state: ReplicaState, ttl_seconds: int) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.keys.replica(state.replica), state.model_dump_json(), ex=ttl_seconds)
        pipe.sadd(self.keys.replicas, state.replica)
        pipe.execute()

    def live_replicas(self) -> list[ReplicaState]:
        """Replicas whose last heartbeat has not expired, sorted by name."""
        names = sorted(self.client.smembers(self.keys.replicas))
        if not names:
            return []
        raws = self.client.mget([self.keys.replica(n) for n in names])
        return [ReplicaState.model_validate_json(raw) for raw in raws if raw is not None]

    # Rollout pointer.
    def get_rollout(self) -> RolloutPointer:
        raw = self.client.get(self.keys.rollout)
        return RolloutPointer() if raw is None else RolloutPointer.model_validate_json(raw)

    def set_rollout(self, pointer: RolloutPointer) -> None:
        self.client.set(self.keys.rollout, pointer.model_dump_json())

    def has_rollout(self) -> bool:
        """Whether anyone (the operator) manages the rollout pointer of this job."""
        return bool(self.client.exists(self.keys.rollout))

    # Rollback command.
    def request_rollback(self, version: int, reason: str = "") -> RollbackRequest:
        """Asks the trainer to continue from `version`; raises ValueError for a version never published."""
        if version != 0 and self.get_version(version) is None:
            raise ValueError(
                f"version {version} is not published (or no longer kept); known: {self.version_numbers()}"
            )
        request = RollbackRequest(version=version, superseded_up_to=self.latest_version(), reason=reason)
        self.client.set(self.keys.rollback, request.model_dump_json())
        return request

    def get_rollback(self) -> RollbackRequest | None:
        raw = self.client.get(self.keys.rollback)
        return None if raw is None else RollbackRequest.model_validate_json(raw)
