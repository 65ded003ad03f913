"""Reads the job's feedback stream through the trainers' consumer group, at least once, never twice.

The life of an entry:
1. Delivered to this consumer (XREADGROUP), or taken over from a dead one (XAUTOCLAIM), or re-read from this
   consumer's own pending list after a restart (XREADGROUP from id 0). Until acknowledged it stays pending in
   Redis, so a crash at any point loses nothing: the entry comes back.
2. Validated. Entries are read as bytes (through a client that never decodes replies), so anything an
   application wrote can be looked at: an entry that is not UTF-8, or not valid feedback, goes to the
   dead-letter stream with the reason and its original fields (cut to a bound; undecodable bytes in base64);
   the dead letter and the acknowledgement are written in one transaction, so a crash cannot duplicate or lose
   it. One bad entry never holds back the others read with it.
3. Deduplicated by feedback id (the application's idempotency key, else the entry id) against the set of
   feedback ids already trained (`trained_feedback`) and against what this consumer already holds.
4. Held in a bounded buffer until the training step that uses it is committed; then `finalize` marks its
   feedback id trained, counts it for its serving version (canary gates) and acknowledges the entry, all in one
   atomic script. Entries that train nothing (rejections) are finalized at once.

Back-pressure: the consumer stops reading while it holds `max_held` entries; the stream itself is the queue, so
applications never block. Lag: entries not yet acknowledged by the group, and the age of the oldest of them.

Retention: acknowledged entries are trimmed from the stream (alchemist_protocol.feedback_stream; never one still
pending or undelivered), the dead-letter stream is capped at about `dead_letter_max_len` entries, and trained
feedback ids are remembered for `trained_horizon_s` (a sorted set scored by the time they were trained), longer
than request records live: feedback for a request whose record expired cannot train anyway.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from alchemist_protocol.feedback_stream import FeedbackLag, entry_time, feedback_lag, trim_acknowledged
from alchemist_protocol.keys import FEEDBACK_GROUP, JobKeys
from alchemist_protocol.redis_connection import bytes_twin, text
from alchemist_protocol.schemas import (
    DEAD_LETTER_FIELD_BYTES,
    Feedback,
    FeedbackLabel,
    InvalidFeedback,
    dead_letter_fields,
    parse_feedback,
)

RawEntry = tuple[str, dict[Any, Any]]  # entry id, fields as read (bytes from the stream client)

# KEYS: trained ids (sorted set: id -> when trained), feedback stream, then one per-version counter hash per
# item (or "" for none). ARGV: group, horizon in seconds (0: keep all), then triples (feedback id, entry id,
# label) per item, in the order of the counter keys. A feedback id seen for the first time is counted once for
# the version that served its request. Ids trained longer than the horizon ago are forgotten.
_FINALIZE = """
local trained, stream = KEYS[1], KEYS[2]
local group, horizon = ARGV[1], tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
if redis.call('TYPE', trained).ok == 'set' then
  -- written before trained ids had a horizon: keep them, from now on
  local members = redis.call('SMEMBERS', trained)
  redis.call('DEL', trained)
  for _, member in ipairs(members) do redis.call('ZADD', trained, now, member) end
end
if horizon > 0 then redis.call('ZREMRANGEBYSCORE', trained, '-inf', '(' .. (now - horizon)) end
local fresh = 0
for i = 3, #KEYS do
  local base = 3 + (i - 3) * 3
  local fid, entry, label = ARGV[base], ARGV[base + 1], ARGV[base + 2]
  if redis.call('ZADD', trained, 'NX', now, fid) == 1 then
    fresh = fresh + 1
    if KEYS[i] ~= '' then redis.call('HINCRBY', KEYS[i], label, 1) end
  end
  redis.call('XACK', stream, group, entry)
end
return fresh
"""


# KEYS: feedback stream. ARGV: group, from consumer, to consumer, entry ids. Moves the entries still pending in
# the first consumer's list to the second (resetting their idle time; from = to only resets it). An entry that
# another consumer claimed meanwhile stays with it.
_MOVE = """
local moved = 0
for i = 4, #ARGV do
  local info = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if info[1] and info[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[i], 'JUSTID')
    moved = moved + 1
  end
end
return moved
"""


@dataclass(frozen=True)
class SettledFeedback:
    """What acknowledging a feedback id needs; also stored in version manifests to redo it after a crash."""

    feedback_id: str
    entry_ids: list[str]
    label: str
    served_version: int | None


def finalize_script(client: redis.Redis) -> Any:
    return client.register_script(_FINALIZE)


def finalize_feedback(
    script: Any, keys: JobKeys, settled: Sequence[SettledFeedback], horizon_s: float = 0.0
) -> int:
    """Runs the finalize script: trained ids, per-version counters and XACK in one atomic step.

    `horizon_s` > 0 also forgets ids trained longer ago than that; 0 forgets nothing.
    """
    if not settled:
        return 0
    key_list = [keys.trained_feedback, keys.feedback]
    args: list[str] = [FEEDBACK_GROUP, repr(float(horizon_s))]
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
    stream_max_len: int = 1_000_000  # backstop: acknowledged entries beyond it go even above a pending one
    trim_every_s: float = 1.0  # acknowledged entries are trimmed at most this often
    dead_letter_max_len: int = 10_000  # the dead-letter stream keeps about this many (XADD MAXLEN ~)
    dead_letter_field_bytes: int = DEAD_LETTER_FIELD_BYTES  # each original field of a dead letter cut to this
    trained_horizon_s: float = 7 * 86_400  # trained feedback ids are remembered this long (idempotency)

    def __post_init__(self) -> None:
        if not self.consumer:
            raise ValueError("the consumer name must be non-empty (use the replica name)")
        if self.read_count < 1 or self.max_held < 1:
            raise ValueError("read_count and max_held must be positive")
        if self.claim_idle_ms < 1:
            raise ValueError("claim_idle_ms must be positive")
        if self.stream_max_len < 0 or self.dead_letter_max_len < 1 or self.dead_letter_field_bytes < 1:
            raise ValueError("stream_max_len must be >= 0 (0: no bound); the dead-letter bounds positive")
        if self.trained_horizon_s <= 0 or self.trim_every_s < 0:
            raise ValueError("trained_horizon_s must be positive and trim_every_s >= 0")


@dataclass
class ConsumerCounters:
    delivered: int = 0
    claimed: int = 0
    dead_letters: int = 0
    duplicates: int = 0
    finalized: int = 0
    trimmed: int = 0


class FeedbackConsumer:
    def __init__(
        self,
        client: redis.Redis,
        keys: JobKeys,
        settings: ConsumerSettings,
        stream_client: redis.Redis | None = None,
    ) -> None:
        """`client` may decode replies; stream entries are read through `stream_client`, whose replies must
        be bytes (default: a `bytes_twin` of `client`)."""
        self.client = client
        self.raw = stream_client if stream_client is not None else bytes_twin(client)
        self.keys = keys
        self.settings = settings
        self.counters = ConsumerCounters()
        self._held: dict[str, FeedbackItem] = {}  # feedback id -> item
        self._held_entries: set[str] = set()
        self._own_cursor: str | None = "0-0"  # None once our own pending list has been re-read
        self._next_claim = 0.0
        self._claim_cursor = "0-0"
        self._finalize = finalize_script(client)
        self._move = client.register_script(_MOVE)
        self._next_trim = 0.0

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
        self._trim_if_due()
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
        entries: list[RawEntry] = []
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

    def _read(self, start: str, block_ms: int | None) -> list[RawEntry]:
        count = self._room()
        if count == 0:
            return []
        reply = self.raw.xreadgroup(
            FEEDBACK_GROUP, self.settings.consumer, {self.keys.feedback: start}, count=count, block=block_ms
        )
        out: list[RawEntry] = []
        gone: list[str] = []
        for _stream, batch in reply or []:
            for eid, fields in batch:
                if fields:
                    out.append((text(eid), dict(fields)))
                else:  # a pending entry deleted from the stream meanwhile: nothing left to train on
                    gone.append(text(eid))
        if gone:
            self.client.xack(self.keys.feedback, FEEDBACK_GROUP, *gone)
        if start == ">":
            self.counters.delivered += len(out)
        return out

    def _claim(self) -> list[RawEntry]:
        """Takes over entries that another consumer left pending for longer than claim_idle_ms."""
        self._next_claim = time.monotonic() + self.settings.claim_every_s
        count = self._room()
        if count == 0:
            return []
        reply = self.raw.xautoclaim(
            self.keys.feedback,
            FEEDBACK_GROUP,
            self.settings.consumer,
            min_idle_time=self.settings.claim_idle_ms,
            start_id=self._claim_cursor,
            count=count,
        )
        cursor, claimed = text(reply[0]), reply[1]
        # A full scan ends at 0-0; start over next time.
        self._claim_cursor = cursor
        # Entries deleted from the stream while pending come back as None and are dropped by XAUTOCLAIM itself.
        out = [(text(eid), dict(fields)) for eid, fields in claimed if fields is not None]
        out = [(eid, fields) for eid, fields in out if eid not in self._held_entries]
        self.counters.claimed += len(out)
        return out

    def _accept(self, entries: Sequence[RawEntry]) -> list[FeedbackItem]:
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
        known = self._already_trained([item.feedback_id for item in parsed])
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

    def _already_trained(self, feedback_ids: list[str]) -> list[bool]:
        try:
            scores = self.client.zmscore(self.keys.trained_feedback, feedback_ids)
        except redis.ResponseError as exc:
            if "WRONGTYPE" not in str(exc):
                raise
            # Still the set of a version before the horizon; the next finalize converts it.
            return [bool(x) for x in self.client.smismember(self.keys.trained_feedback, feedback_ids)]
        return [score is not None for score in scores]

    def _dead_letter(self, entry_id: str, fields: dict[Any, Any], reason: str) -> None:
        letter = dead_letter_fields(entry_id, fields, reason, self.settings.dead_letter_field_bytes)
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.keys.dead_letters, letter, maxlen=self.settings.dead_letter_max_len, approximate=True)
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
        fresh = finalize_feedback(self._finalize, self.keys, settled, self.settings.trained_horizon_s)
        for item in items:
            self._release(item)
        self.counters.finalized += len(items)
        self._trim_if_due(force=True)
        return fresh

    def _trim_if_due(self, force: bool = False) -> None:
        """Retention of the feedback stream: acknowledged entries go (see feedback_stream.trim_acknowledged).

        At most every `trim_every_s` from `poll`; at once after `finalize`, and at the first poll after a
        `release` (which follows a version's commit, whose feedback the publisher acknowledged).
        """
        now = time.monotonic()
        if not force and now < self._next_trim:
            return
        self._next_trim = now + self.settings.trim_every_s
        self.counters.trimmed += trim_acknowledged(
            self.raw, self.keys.feedback, FEEDBACK_GROUP, self.settings.stream_max_len
        )

    def release(self, items: Iterable[FeedbackItem]) -> None:
        """Forgets items without acknowledging them (they stay pending and come back on the next restart)."""
        for item in items:
            self._release(item)
        self._next_trim = 0.0

    # Data-parallel training (distributed/): each replica trains the feedback on requests it served.
    def hand_off(self, item: FeedbackItem, owner: str) -> None:
        """Moves a held item to consumer `owner` (XCLAIM): it stays pending, now in the owner's list, which
        the owner re-reads (`reread_own_pending`); if the owner dies, XAUTOCLAIM brings it back to anyone."""
        me = self.settings.consumer
        self._move(keys=[self.keys.feedback], args=[FEEDBACK_GROUP, me, owner, *item.entry_ids])
        self._release(item)

    def touch_held(self) -> None:
        """Resets the idle time of the entries we hold, so that no live replica claims them (XAUTOCLAIM only
        takes entries idle for `claim_idle_ms`, meant for dead consumers' entries)."""
        entries = sorted(self._held_entries)
        for start in range(0, len(entries), 256):
            me = self.settings.consumer
            self._move(
                keys=[self.keys.feedback], args=[FEEDBACK_GROUP, me, me, *entries[start : start + 256]]
            )

    def reread_own_pending(self) -> None:
        """The next poll reads our pending list again: entries other replicas handed to us wait there."""
        if self._own_cursor is None:
            self._own_cursor = "0-0"

    def _release(self, item: FeedbackItem) -> None:
        self._held.pop(item.feedback_id, None)
        for entry_id in item.entry_ids:
            self._held_entries.discard(entry_id)

    # Observability.
    def lag(self) -> FeedbackLag:
        """Entries the group has not acknowledged yet, and how old the oldest is (never reads a field as text)."""
        return feedback_lag(self.raw, self.keys.feedback, FEEDBACK_GROUP)

    def close(self) -> None:
        self.raw.close()


def is_trainable(feedback: Feedback) -> bool:
    """Supervised objective: accepted answers and corrections are imitated; rejections are not."""
    return feedback.label in (FeedbackLabel.POSITIVE, FeedbackLabel.CORRECTION)
