"""`alchemist feedback tail`: the newest entries of a job's feedback stream (or its dead letters), then new ones.

Entries are shown as the trainer will see them: parsed with the protocol's own `parse_feedback`, so an entry that
will be dead-lettered shows its reason here already. Read through the bytes client and never through the
trainers' consumer group: tailing acknowledges nothing and takes nothing away from training.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
from alchemist_protocol.feedback_stream import entry_time
from alchemist_protocol.redis_connection import text
from alchemist_protocol.schemas import InvalidFeedback, parse_feedback
from rich.table import Table
from rich.text import Text


@dataclass(frozen=True)
class TailRow:
    entry_id: str
    request_id: str
    label: str
    detail: str  # correction text, rating or idempotency key; the reason for an invalid or dead entry
    valid: bool


def feedback_row(entry_id: str, fields: dict[Any, Any]) -> TailRow:
    try:
        feedback = parse_feedback(fields)
    except InvalidFeedback as bad:
        raw = {text(k): text(v) for k, v in fields.items()}
        return TailRow(
            entry_id, raw.get("request_id", ""), raw.get("label", ""), f"invalid: {bad.reason}", False
        )
    detail = []
    if feedback.correction is not None:
        detail.append(repr(feedback.correction[:80]))
    if feedback.rating is not None:
        detail.append(f"rating {feedback.rating:+.2f}")
    if feedback.idempotency_key is not None:
        detail.append(f"key {feedback.idempotency_key}")
    return TailRow(entry_id, feedback.request_id, feedback.label.value, " ".join(detail), True)


def dead_letter_row(entry_id: str, fields: dict[Any, Any]) -> TailRow:
    named = {text(k): text(v) for k, v in fields.items()}
    return TailRow(
        entry_id,
        named.get("orig.request_id", ""),
        named.get("orig.label", ""),
        named.get("reason", ""),
        False,
    )


def tail_table(rows: list[TailRow], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("time (UTC)", "entry", "response id", "label", "detail"):
        table.add_column(column)
    for row in rows:
        stamp = datetime.datetime.fromtimestamp(entry_time(row.entry_id), datetime.UTC)
        table.add_row(
            stamp.strftime("%Y-%m-%d %H:%M:%S"),
            row.entry_id,
            row.request_id,
            row.label,
            Text(row.detail, style="" if row.valid else "red"),
        )
    return table


def row_line(row: TailRow) -> Text:
    """One entry as one line, for following a stream."""
    stamp = datetime.datetime.fromtimestamp(entry_time(row.entry_id), datetime.UTC).strftime("%H:%M:%S")
    line = Text(f"{stamp} {row.entry_id} {row.request_id} {row.label} ")
    line.append(row.detail, style="" if row.valid else "red")
    return line


def newest(raw: redis.Redis, stream: str, count: int, dead: bool) -> list[TailRow]:
    """The `count` newest entries, oldest first. `raw`: a bytes client."""
    make = dead_letter_row if dead else feedback_row
    return [make(text(eid), fields) for eid, fields in reversed(raw.xrevrange(stream, count=count))]


def follow(
    raw: redis.Redis,
    stream: str,
    after: str,
    dead: bool,
    block_ms: int = 1000,
    keep_going: Callable[[], bool] = lambda: True,
) -> Iterator[TailRow]:
    """Entries added after `after` ("$": from now), as they arrive, while `keep_going()`."""
    make = dead_letter_row if dead else feedback_row
    last = after
    if last == "$":
        top = raw.xrevrange(stream, count=1)
        last = text(top[0][0]) if top else "0-0"
    while keep_going():
        replies = raw.xread({stream: last}, block=block_ms, count=100)
        for _, entries in replies or ():
            for eid, fields in entries:
                last = text(eid)
                yield make(last, fields)
