"""`alchemist status` against a real Redis (and, in the end-to-end test, kmock)."""

from __future__ import annotations

import pytest
from alchemist_cli.main import main, redis_url_for
from alchemist_cli.redis_view import reason_group
from alchemist_protocol.training_group import GroupRecord

from tests.cli.job_state import JOB, NS, store_for, write_canary_job


def status(capsys: pytest.CaptureFixture[str], url: str, *flags: str) -> tuple[int, str]:
    code = main(["status", JOB, "-n", NS, "--redis-url", url, "--no-kubernetes", *flags], environ={})
    return code, capsys.readouterr().out


def row(out: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is `first`."""
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("│┃").split("│")]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{out}")


def test_status_shows_lineage_rollout_gate_lag_dead_letters_and_replicas(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    write_canary_job(store_for(redis_url))
    code, out = status(capsys, redis_url)
    assert code == 0
    # Lineage, loss and reuse, feedback per version, roles in the rollout.
    assert row(out, "3")[:8] == ["3", "2", "canary", "4", "0.4800", "1", "3", "12/20 (60%)"]
    assert row(out, "2")[:8] == ["2", "1", "stable", "4", "0.5200", "4", "0", "30/40 (75%)"]
    assert row(out, "0")[:3] == ["0", "", "base model"]
    # Rollout state and gate readings since the canary began (baselines subtracted).
    assert "version 3 on chat-2" in out
    assert "canary v3: 10/16 (62%) accepted since the canary began" in out
    assert "stable v2: 10/10 (100%) accepted since the canary began" in out
    # Feedback lag and dead letters grouped by reason.
    assert "4 entries not yet trained" in out
    assert row(out, "dead letters")[1] == "4"
    assert row(out, "x3")[1] == "label: Input should be …, … or …"
    assert row(out, "x1")[1] == "request … unknown"
    # Each replica with the version it serves and the one it should.
    assert row(out, "chat-1")[:4] == ["chat-1", "1", "2", "yes"]
    assert row(out, "chat-2")[:3] == ["chat-2", "3", "3"]
    assert "Kubernetes: not read (--no-kubernetes)" in out


def test_trainer_lease_and_training_group_when_present(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store = store_for(redis_url)
    write_canary_job(store)
    _, out = status(capsys, redis_url)
    assert "trainer lease" not in out and "rank" not in out  # a job without a group shows no empty column
    store.client.set(store.keys.trainer_lease, "chat-0/3/9f2c")
    group = GroupRecord(
        generation=2,
        members=["chat-0", "chat-2"],
        master_addr="10.0.0.5",
        master_port=29500,
        restore_version=2,
    )
    store.client.set(store.keys.training_group, group.model_dump_json())
    _, out = status(capsys, redis_url)
    assert "trainer lease: chat-0; training group generation 2, 2 members" in out
    assert row(out, "chat-0")[-1] == "0" and row(out, "chat-2")[-1] == "1" and row(out, "chat-1")[-1] == ""


def test_versions_limit_hides_the_base_row(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    write_canary_job(store_for(redis_url))
    _, out = status(capsys, redis_url, "--versions", "1")
    assert row(out, "3")[0] == "3"
    with pytest.raises(AssertionError):
        row(out, "1")


def test_unreachable_redis_and_no_cluster_is_an_error_not_a_crash(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out = status(capsys, "redis://127.0.0.1:1/0")
    assert code == 1
    assert "Redis: redis://127.0.0.1:1/0:" in out and "Connection refused" in out


def test_redis_url_precedence() -> None:
    spec = {"feedback": {"redisUrl": "redis://from-spec:6379/0"}}
    assert redis_url_for("redis://flag/0", {"ALCHEMIST_REDIS_URL": "redis://env/0"}, spec) == "redis://flag/0"
    assert redis_url_for(None, {"ALCHEMIST_REDIS_URL": "redis://env/0"}, spec) == "redis://env/0"
    assert redis_url_for(None, {}, spec) == "redis://from-spec:6379/0"
    assert redis_url_for(None, {}, {}) == "redis://127.0.0.1:6379/0"


def test_reason_group_keeps_the_kind_of_problem() -> None:
    assert reason_group("undecodable entry: field 'label' is not UTF-8 (byte 0xff at offset 3)") == (
        "undecodable entry: field … is not UTF-N (byte N at offset N)"
    )
