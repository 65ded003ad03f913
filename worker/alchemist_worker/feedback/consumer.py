"""Reads the job's feedback stream through the trainers' consumer group, at least once, never twice.

The life of an entry:
1. Delivered to this consumer (XREADGROUP), or taken over from a dead one (XAUTOCLAIM), or re-read from this
   consumer's own pending list after a restart (XREADGROUP from id 0). Until acknowledged it stays pending in
   Redis, so a crash at any point loses nothing: the entry comes back.
2. Validated. An invalid entry goes to the dead-letter stream with the reason and its original fields; the
   dead letter and the acknowledgement are written in one transaction, so a crash cannot duplicate or lose it.
3. Deduplicated by feedback id (the application's idempotency key, else the entry id) against the set of
   feedback ids already trained (`trained_feedback`) and against what this consumer already holds.
4. Held in a bounded buffer until the training step that uses it is committed; then `finalize` marks its
   feedback id trained, counts it for its serving version (canary gates) and acknowledges the entry, all in one
   atomic script. Entries that train nothing (rejections) are finalized at once.

Back-pressure: the consumer stops reading while it holds `max_held` entries; the stream itself is the queue, so
applications never block. Lag: entries not yet acknowledged by the group, and the age of the oldest of them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from alchemist_protocol.keys import FEEDBACK_GROUP, JobKeys
from alchemist_protocol.schemas import (
    Feedback,
    FeedbackLabel,
    InvalidFeedback,
    dead_letter_fields,
    parse_feedback,
)

# KEYS: trained set, feedback stream, then one per-version counter hash per item (or "" for none).
# ARGV: group, then triples (feedback id, entry id, label) per item, in the order of the counter keys.
# A feedback id seen for the first time is counted once for the version that served its request.
_FINALIZE = """
local trained, stream = KEYS[1], KEYS[2]
local group = ARGV[1]
local fresh = 0
for i = 3, #KEYS do
  local base = 2 + (i - 3) * 3
  local fid, entry, label = ARGV[base], ARGV[base + 1], ARGV[base + 2]
  if redis.call('SADD', trained, fid) == 1 then
    fresh = fresh + 1
    if KEYS[i] ~= '' then redis.call('HINCRBY', KEYS[i], label, 1) end
  end
  redis.call('XACK', stream, group, entry)
end
return fresh
"""


def entry_time(entry_id: str) -> float:
    """Seconds since the epoch at which Redis added the entry (stream ids start with milliseconds)."""
    return int(entry_id.split("-", 1)[0]) / 1000.0


@dataclass(frozen=True)
class SettledFeedback:
    """What acknowledging a feedback id needs; also stored in version manifests to redo it after a crash."""

    feedback_id: str
    entry_ids: list[str]
    label: str
    served_version: int | None


def finalize_script(client: redis.Redis) -> Any:
    return client.register_script(_FINALIZE)


def finalize_feedback(script: Any, keys: JobKeys, settled: Sequence[SettledFeedback]) -> int:
    """Runs the finalize script: trained set, per-version counters and XACK in one atomic step."""
    if not settled:
        return 0
    key_list = [keys.trained_feedback, keys.feedback]
    args: list[str] = [FEEDBACK_GROUP]
    for item in settled:
        for entry_id in item.entry_ids:
            key_list.append("" if item.served_version is None else keys.version_feedback(item.served_version))
            args += [item.feedback_id, entry_id, item.label]
    return int(script(keys=key_list, args=args))


@dataclass
class FeedbackItem:
    """A valid, not yet trained feedback entry; `duplicates` are later entries with the same feedback id."""

    entry_id: str
    feedback: Feedback
    feedback_id: str
    duplicates: list[str] = field(default_factory=list)

    @property
    def entry_ids(self) -> list[str]:
        return [self.entry_id, *self.duplicates]


@dataclass(frozen=True)
class ConsumerSettings:
    consumer: str  # stable across restarts (the replica name), so a restart re-reads its own pending entries
    read_count: int = 64
    max_held: int = 1024
    claim_idle_ms: int = 60_000  # a pending entry idle this long belongs to a dead consumer
    claim_every_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.consumer:
            raise ValueError("the consumer name must be non-empty (use the replica name)")
        if self.read_count < 1 or self.max_held < 1:
            raise ValueError("read_count and max_held must be positive")
        if self.claim_idle_ms < 1:
            raise ValueError("claim_idle_ms must be positive")


@dataclass
class ConsumerCounters:
    delivered: int = 0
    claimed: int = 0
    dead_letters: int = 0
    duplicates: int = 0
    finalized: int = 0


@dataclass(frozen=True)
class FeedbackLag:
    entries: int  # in the stream and not yet acknowledged by the group (undelivered + pending)
    seconds: float  # age of the oldest of them; 0 when none


class FeedbackConsumer:
    def __init__(self, client: redis.Redis, keys: JobKeys, settings: ConsumerSettings) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        self.counters = ConsumerCounters()
        self._held: dict[str, FeedbackItem] = {}  # feedback id -> item
        self._held_entries: set[str] = set()
        self._own_cursor: str | None = "0-0"  # None once our own pending list has been re-read
        self._next_claim = 0.0
        self._claim_cursor = "0-0"
        self._finalize = finalize_script(client)

    # Reading.
    def ensure_group(self) -> None:
        """Creates the group (and the stream) when missing. From id 0: a new group misses nothing."""
        try:
            self.client.xgroup_create(self.keys.feedback, FEEDBACK_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def reset_after_redis_loss(self) -> None:
        """After Redis lost its data, entries we hold can no longer be acknowledged; re-read from scratch."""
        self._own_cursor = "0-0"
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._held.clear()
        self._held_entries.clear()

    @property
    def held(self) -> int:
        return len(self._held_entries)

    @property
    def has_room(self) -> bool:
        return self.held < self.settings.max_held

    def poll(self, block_ms: int | None = None) -> list[FeedbackItem]:
        """New valid items, oldest first. Invalid ones are dead-lettered, duplicates swallowed.

        Reads nothing while the buffer is full (back-pressure). `block_ms` waits for new entries when none is
        ready; None never waits.
        """
        if not self.has_room:
            return []
        try:
            return self._poll(block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_group()  # the stream or group vanished (Redis restarted empty, or someone deleted it)
            self.reset_after_redis_loss()
            return []

    def _poll(self, block_ms: int | None) -> list[FeedbackItem]:
        entries: list[tuple[str, dict[Any, Any]]] = []
        if self._own_cursor is not None:
            # Our own pending entries: delivered to us before a restart and never acknowledged.
            room = self._room()
            batch = self._read(self._own_cursor, None)
            self._own_cursor = batch[-1][0] if len(batch) >= room and batch else None
            entries += [(eid, fields) for eid, fields in batch if eid not in self._held_entries]
        if time.monotonic() >= self._next_claim and self.has_room:
            entries += self._claim()
        if not entries:
            entries = self._read(">", block_ms)
        return self._accept(entries)

    def _room(self) -> int:
        return max(0, min(self.settings.read_count, self.settings.max_held - self.held))

    def _read(self, start: str, block_ms: int | None) -> list[tuple[str, dict[Any, Any]]]:
        count = self._room()
        if count == 0:
            return []
        reply = self.client.xreadgroup(
            FEEDBACK_GROUP, self.settings.consumer, {self.keys.feedback: start}, count=count, block=block_ms
        )
        out: list[tuple[str, dict[Any, Any]]] = []
        gone: list[str] = []
        for _stream, batch in reply or []:
            for eid, fields in batch:
                if fields:
                    out.append((str(eid), dict(fields)))
                else:  # a pending entry deleted from the stream meanwhile: nothing left to train on
                    gone.append(str(eid))
        if gone:
            self.client.xack(self.keys.feedback, FEEDBACK_GROUP, *gone)
        if start == ">":
            self.counters.delivered += len(out)
        return out

    def _claim(self) -> list[tuple[str, dict[Any, Any]]]:
        """Takes over entries that another consumer left pending for longer than claim_idle_ms."""
        self._next_claim = time.monotonic() + self.settings.claim_every_s
        count = self._room()
        if count == 0:
            return []
        reply = self.client.xautoclaim(
            self.keys.feedback,
            FEEDBACK_GROUP,
            self.settings.consumer,
            min_idle_time=self.settings.claim_idle_ms,
            start_id=self._claim_cursor,
            count=count,
        )
        cursor, claimed = str(reply[0]), reply[1]
        # A full scan ends at 0-0; start over next time.
        self._claim_cursor = cursor
        # Entries deleted from the stream while pending come back as None and are dropped by XAUTOCLAIM itself.
        out = [(str(eid), dict(fields)) for eid, fields in claimed if fields is not None]
        out = [(eid, fields) for eid, fields in out if eid not in self._held_entries]
        self.counters.claimed += len(out)
        return out

    def _accept(self, entries: Sequence[tuple[str, dict[Any, Any]]]) -> list[FeedbackItem]:
        parsed: list[FeedbackItem] = []
        for entry_id, fields in entries:
            try:
                feedback = parse_feedback(fields)
            except InvalidFeedback as bad:
                self._dead_letter(entry_id, fields, bad.reason)
                continue
            parsed.append(FeedbackItem(entry_id, feedback, feedback.feedback_id(entry_id)))
        if not parsed:
            return []
        known = self.client.smismember(self.keys.trained_feedback, [item.feedback_id for item in parsed])
        already = [item.entry_id for item, seen in zip(parsed, known, strict=True) if seen]
        if already:
            self.client.xack(self.keys.feedback, FEEDBACK_GROUP, *already)
            self.counters.duplicates += len(already)
        new: list[FeedbackItem] = []
        for item, seen in zip(parsed, known, strict=True):
            if seen:
                continue
            first = self._held.get(item.feedback_id)
            if first is not None:  # same feedback id in flight: acknowledge it together with the first
                first.duplicates.append(item.entry_id)
                self.counters.duplicates += 1
            else:
                self._held[item.feedback_id] = item
                new.append(item)
            self._held_entries.add(item.entry_id)
        return sorted(new, key=lambda item: entry_time(item.entry_id))

    def _dead_letter(self, entry_id: str, fields: dict[Any, Any], reason: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.keys.dead_letters, dead_letter_fields(entry_id, fields, reason))
        pipe.xack(self.keys.feedback, FEEDBACK_GROUP, entry_id)
        pipe.execute()
        self.counters.dead_letters += 1

    # Settling held items.
    def dead_letter(self, item: FeedbackItem, reason: str) -> None:
        """A valid entry that still cannot be trained (e.g. its request is unknown): out of the way, with why."""
        fields = item.feedback.to_fields()
        for entry_id in item.entry_ids:
            self._dead_letter(entry_id, fields, reason)
        self._release(item)

    def finalize(self, items: Iterable[FeedbackItem], served_versions: dict[str, int] | None = None) -> int:
        """Marks items trained (or deliberately not trained) and acknowledges them. Call after the commit.

        `served_versions` maps feedback id -> the version that served the request, for the per-version
        feedback counters. Idempotent: a feedback id is counted once however often this runs. Returns how many
        feedback ids were new.
        """
        items = list(items)
        versions = served_versions or {}
        settled = [
            SettledFeedback(
                item.feedback_id, item.entry_ids, item.feedback.label.value, versions.get(item.feedback_id)
            )
            for item in items
        ]
        fresh = finalize_feedback(self._finalize, self.keys, settled)
        for item in items:
            self._release(item)
        self.counters.finalized += len(items)
        return fresh

    def release(self, items: Iterable[FeedbackItem]) -> None:
        """Forgets items without acknowledging them (they stay pending and come back on the next restart)."""
        for item in items:
            self._release(item)

    def _release(self, item: FeedbackItem) -> None:
        self._held.pop(item.feedback_id, None)
        for entry_id in item.entry_ids:
            self._held_entries.discard(entry_id)

    # Observability.
    def lag(self) -> FeedbackLag:
        """Entries the group has not acknowledged yet, and how old the oldest is."""
        try:
            groups = self.client.xinfo_groups(self.keys.feedback)
        except redis.ResponseError:
            return FeedbackLag(0, 0.0)
        group = next((g for g in groups if _text(g.get("name")) == FEEDBACK_GROUP), None)
        if group is None:
            return FeedbackLag(0, 0.0)
        pending = int(group.get("pending") or 0)
        last = _text(group.get("last-delivered-id")) or "0-0"
        undelivered_raw = group.get("lag")
        if undelivered_raw is None:  # Redis < 7 reports no lag: count what follows the last delivered id
            undelivered = len(self.client.xrange(self.keys.feedback, min=f"({last}", count=100_000))
        else:
            undelivered = int(undelivered_raw)
        oldest: str | None = None
        if pending:
            summary = self.client.xpending(self.keys.feedback, FEEDBACK_GROUP)
            oldest = _text(summary.get("min")) if summary else None
        elif undelivered:
            first = self.client.xrange(self.keys.feedback, min=f"({last}", count=1)
            oldest = str(first[0][0]) if first else None
        age = max(0.0, time.time() - entry_time(oldest)) if oldest else 0.0
        return FeedbackLag(pending + undelivered, age)


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def is_trainable(feedback: Feedback) -> bool:
    """Supervised objective: accepted answers and corrections are imitated; rejections are not."""
    return feedback.label in (FeedbackLabel.POSITIVE, FeedbackLabel.CORRECTION)
