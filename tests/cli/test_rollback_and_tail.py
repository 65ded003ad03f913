"""`alchemist rollback` and `alchemist feedback tail` against a real Redis."""

from __future__ import annotations

import threading
import time

import pytest
from alchemist_cli.feedback_tail import follow
from alchemist_cli.main import main
from alchemist_operator.rollout import Phase
from alchemist_operator.rollout_memory import remembered_state, rewind_reason
from alchemist_operator.rollout_store import read_snapshot
from alchemist_protocol.rollout_state import load_rollout
from alchemist_protocol.schemas import Feedback, FeedbackLabel
from alchemist_worker.rollout.follower import FollowMode, target_version

from tests.cli.job_state import JOB, NS, store_for, write_canary_job


def run(url: str, *argv: str) -> int:
    return main([*argv, "-n", NS, "--redis-url", url, "--no-kubernetes"], environ={})


def test_rollback_moves_every_replica_and_the_trainer_back(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store = store_for(redis_url)
    write_canary_job(store)
    assert run(redis_url, "rollback", JOB, "1", "--reason", "answers got worse", "--settle", "0.1") == 0
    out = capsys.readouterr().out
    assert "every replica is asked to serve version 1; not served again: 2, 3" in out
    # The trainer's message, as the existing rollback path writes it.
    request = store.get_rollback()
    assert request is not None and (request.version, request.superseded_up_to) == (1, 3)
    assert request.reason == "answers got worse"
    # Workers following the pointer go to version 1, the canary replica too.
    pointer, _ = load_rollout(store.client, store.keys)
    for replica in ("chat-0", "chat-1", "chat-2"):
        assert target_version(FollowMode.AUTO, replica, pointer, 3, request, 2) == 1
    # The operator takes the older pointer as deliberate (no RedisStateLost rewind to the version it remembered)
    # and does not roll forward to the versions left behind.
    snapshot = read_snapshot(store, store.keys.feedback, time.time())
    assert snapshot.state.stable == 1 and snapshot.state.phase is Phase.IDLE
    assert snapshot.state.rejected == (2, 3)
    remembered = remembered_state({"rollout": {"stableVersion": 2, "rejectedVersions": []}})
    assert rewind_reason(snapshot.state, True, remembered, request.version) is None
    # And the status shows it.
    assert run(redis_url, "status", JOB) == 0
    out = capsys.readouterr().out
    assert "to version 1 (honoured until a version above 3 is published): answers got worse" in out


def test_rollback_to_an_unknown_version_changes_nothing(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store = store_for(redis_url)
    write_canary_job(store)
    assert run(redis_url, "rollback", JOB, "9", "--settle", "0") == 2
    assert "version 9 is not published" in capsys.readouterr().err
    assert store.get_rollback() is None and store.get_rollout().canary_version == 3


def test_feedback_tail_shows_entries_as_the_trainer_will_parse_them(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store = store_for(redis_url)
    write_canary_job(store)
    store.client.xadd(store.keys.feedback, {"request_id": "chatcmpl-z", "label": "correction"})
    store.client.xadd(
        store.keys.feedback,
        Feedback(request_id="chatcmpl-c", label=FeedbackLabel.CORRECTION, correction="Paris.").to_fields(),
    )
    assert run(redis_url, "feedback", "tail", JOB, "--count", "3") == 0
    out = capsys.readouterr().out
    assert "(3 newest)" in out and "chatcmpl-3" in out and "chatcmpl-2" not in out
    assert "invalid: entry: Value error, label 'correction' needs a non-empty 'correction' text" in out
    assert "'Paris.'" in out
    assert run(redis_url, "feedback", "tail", JOB, "--dead", "--count", "10") == 0
    assert capsys.readouterr().out.count("chatcmpl-x") == 4


def test_follow_yields_entries_added_later(redis_url: str) -> None:
    store = store_for(redis_url)
    write_canary_job(store)
    stop = threading.Event()

    def add_later() -> None:
        time.sleep(0.3)
        store.client.xadd(
            store.keys.feedback, Feedback(request_id="late", label=FeedbackLabel.NEGATIVE).to_fields()
        )

    threading.Thread(target=add_later, daemon=True).start()
    rows = follow(
        store.stream_client,
        store.keys.feedback,
        "$",
        False,
        block_ms=200,
        keep_going=lambda: not stop.is_set(),
    )
    first = next(rows)
    stop.set()
    assert (first.request_id, first.label, first.valid) == ("late", "negative", True)
