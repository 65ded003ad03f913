"""What Redis knows about a job, read in one pass: versions and lineage, rollout, replicas, feedback, dead letters.

Read-only. Stream entries go through the bytes client (`JobStore.stream_client`): applications write them, and one
that is not UTF-8 must not stop a person from seeing the rest.
"""

from __future__ import annotations

import collections
import re
import time
from dataclasses import dataclass, field

import redis
from alchemist_protocol.feedback_stream import FeedbackLag
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import JobKeys
from alchemist_protocol.redis_connection import text
from alchemist_protocol.rollout_state import RolloutProgress, load_rollout
from alchemist_protocol.schemas import (
    FeedbackLabel,
    ReplicaState,
    RollbackRequest,
    RolloutPointer,
    VersionInfo,
)
from alchemist_protocol.training_group import GroupRecord, TrainingGroupStore

DEAD_LETTER_SCAN = 1000  # newest dead letters grouped by reason


@dataclass(frozen=True)
class DeadLetter:
    entry_id: str
    reason: str
    request_id: str


@dataclass(frozen=True)
class DeadLetters:
    total: int = 0
    by_reason: tuple[tuple[str, int], ...] = ()  # most frequent first, over the newest DEAD_LETTER_SCAN
    latest: tuple[DeadLetter, ...] = ()  # newest first


@dataclass(frozen=True)
class RedisView:
    versions: tuple[VersionInfo, ...]  # newest first, at most the number asked for
    published: tuple[int, ...]  # every published version number, ascending
    feedback: dict[int, dict[str, int]]  # per shown version: label -> count
    pointer: RolloutPointer | None
    progress: RolloutProgress
    rollback: RollbackRequest | None
    replicas: tuple[ReplicaState, ...]
    lag: FeedbackLag
    stream_length: int
    dead: DeadLetters
    group: GroupRecord | None = None  # the data-parallel training group, when the replicas train together
    trainer: str = ""  # the replica holding the trainer lease (the one that publishes versions)
    now: float = field(default_factory=time.time)


def open_store(
    url: str, namespace: str, job: str, stream: str | None = None, password: str | None = None
) -> JobStore:
    """A job store with short timeouts (a person waits on it); a password in the URL wins over `password`."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"Redis URL {url!r} must start with redis://, rediss:// (TLS) or unix://")
    client = redis.Redis.from_url(
        url, decode_responses=True, password=password, socket_timeout=5.0, socket_connect_timeout=5.0
    )
    return JobStore(client, JobKeys(namespace, job, stream))


def reason_group(reason: str) -> str:
    """A dead letter's reason without the parts that differ per entry (quoted values, numbers)."""
    general = re.sub(r"'[^']*'|\"[^\"]*\"", "…", reason)
    general = re.sub(r"0x[0-9a-f]+|\d+(\.\d+)?", "N", general)
    return general if len(general) <= 100 else general[:99] + "…"


def read_dead_letters(
    raw: redis.Redis, stream: str, scan: int = DEAD_LETTER_SCAN, latest: int = 5
) -> DeadLetters:
    """`raw`: a bytes client."""
    total = int(raw.xlen(stream))
    if not total:
        return DeadLetters()
    entries = raw.xrevrange(stream, count=scan)
    letters = []
    for entry_id, fields in entries:
        named = {text(k): text(v) for k, v in fields.items()}
        letters.append(DeadLetter(text(entry_id), named.get("reason", ""), named.get("orig.request_id", "")))
    groups = collections.Counter(reason_group(letter.reason) for letter in letters)
    return DeadLetters(total, tuple(groups.most_common()), tuple(letters[:latest]))


def read_view(store: JobStore, versions: int = 10) -> RedisView:
    published = tuple(store.version_numbers())
    shown = published[::-1][:versions]
    infos = tuple(info for n in shown if (info := store.get_version(n)) is not None)
    pointer, progress = load_rollout(store.client, store.keys)
    counted = {*shown, 0}
    if pointer is not None:
        counted |= {pointer.stable_version} | ({pointer.canary_version} if pointer.canary_version else set())
    feedback = {
        v: {
            label.value: n
            for label, n in store.feedback_counts(v).items()
            if isinstance(label, FeedbackLabel)
        }
        for v in sorted(counted)
    }
    return RedisView(
        versions=infos,
        published=published,
        feedback=feedback,
        pointer=pointer,
        progress=progress,
        rollback=store.get_rollback(),
        replicas=tuple(store.live_replicas()),
        lag=store.feedback_lag(),
        stream_length=int(store.stream_client.xlen(store.keys.feedback)),
        dead=read_dead_letters(store.stream_client, store.keys.dead_letters),
        group=TrainingGroupStore(store.client, store.keys).read(),
        trainer=(store.client.get(store.keys.trainer_lease) or "").split("/", 1)[0],
    )
