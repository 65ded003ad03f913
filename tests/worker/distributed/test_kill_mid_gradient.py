"""A member killed (kill -9), then one stalled, in the middle of its local gradient, the others waiting for it.

The member's log says when the engine thread has started its local gradient and when it ended (rounds.py).
As soon as the first line appears the test freezes the member (SIGSTOP) and reads the log: with no end line
after it, the member is inside its gradient; otherwise (the gradient was quicker than the test) the test lets
it go on and tries the next round. The member serves requests meanwhile, as a replica does, and slices are
short: its gradient advances in slices between decode iterations, over many engine iterations.

Killed there: the others' collectives fail at once (the kernel closes a dead process's connections), they
re-form and go on; the dead member's feedback is claimed and recomputed by a survivor; the member restarts,
loads the newest version and rejoins. Stalled there (kept frozen): the others time out after the round
timeout, re-form without it (its offer expired) and go on; resumed, it finds its generation gone and rejoins.
Every feedback id ends in exactly one version and nothing stays pending.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
from alchemist_protocol.job_store import JobStore
from alchemist_worker.versions.directory import VersionDirectory

from tests.worker.continual.conftest import wait_until
from tests.worker.continual.worker_process import WorkerProcess
from tests.worker.distributed.group_processes import (
    KEYS,
    ROUND_PER_BATCH_SGD,
    FeedbackSender,
    group_status,
    group_worker,
    of_rank,
    pending_entries,
    start_all,
    wait_members,
    wait_serving,
)
from tests.worker.distributed.one_trainer_reference import check_against_one_trainer, trained, wait_trained

pytestmark = pytest.mark.slow
STARTED = re.compile(rb"round of generation \d+: local gradient of \d+ samples started")
ENDED = re.compile(rb"round of generation \d+: local gradient of \d+ samples (done|failed)")


def serving_load(
    worker: WorkerProcess, model: str, stop: threading.Event, streams: int = 3
) -> list[threading.Thread]:
    """Requests to `worker`, `streams` at a time, until `stop`: its engine keeps decoding."""

    def loop() -> None:
        body = {
            "model": model,
            "prompt": "once upon a time",
            "max_tokens": 96,
            "ignore_eos": True,
            "record": False,
        }
        while not stop.is_set():
            try:
                httpx.post(worker.base_url + "/v1/completions", json=body, timeout=60)
            except httpx.HTTPError:
                return  # killed

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(streams)]
    for thread in threads:
        thread.start()
    return threads


def stopped(worker: WorkerProcess) -> bool:
    """Whether the process is stopped by a signal (state T in /proc)."""
    assert worker.process is not None
    stat = Path(f"/proc/{worker.process.pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


def freeze_inside_local_gradient(victim: WorkerProcess, offset: int, timeout: float) -> int | None:
    """SIGSTOP as soon as the victim's log (from byte `offset`) says a local gradient started. Returns where
    its log ends if it is frozen inside that gradient (no end line after the start); else resumes it (SIGCONT)
    and returns None."""
    assert victim.process is not None
    deadline = time.monotonic() + timeout
    seen = b""
    with open(victim.log, "rb") as log:
        log.seek(offset)
        while time.monotonic() < deadline:
            chunk = log.read()
            if not chunk:
                time.sleep(0.001)
                continue
            seen += chunk
            started = STARTED.search(seen)
            if started is None:
                continue
            os.kill(victim.process.pid, signal.SIGSTOP)
            wait_until(lambda: stopped(victim), 10, "the victim to stop")
            seen += log.read()  # whatever it logged before it stopped (each record is flushed)
            if ENDED.search(seen, started.end()):
                os.kill(victim.process.pid, signal.SIGCONT)
                return None
            return offset + len(seen)
    raise AssertionError(f"the victim's local gradient did not start within {timeout}s; see {victim.log}")


def test_kill_9_and_a_stall_inside_the_local_gradient(
    tiny_checkpoints: dict[str, Path], redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    checkpoint = tiny_checkpoints["llama"]
    directory = VersionDirectory(tmp_path / "versions")
    env = {
        **ROUND_PER_BATCH_SGD,
        "ALCHEMIST_DP_ROUND_TIMEOUT_SECONDS": "6",
        "ALCHEMIST_FEEDBACK_CLAIM_IDLE_MS": "10000",
        # Training slices of about a millisecond: a gradient takes many engine iterations.
        "ALCHEMIST_TRAINING_SLICE_MS": "1",
        "ALCHEMIST_TRAINING_IDLE_SLICE_MS": "1",
    }
    everyone = [
        group_worker(checkpoint, redis_url, directory.root, tmp_path, f"k{n}", **env) for n in range(3)
    ]
    store = JobStore(redis_client, KEYS)
    sender = FeedbackSender(store, checkpoint.name)
    feedback_on, sent = sender.on, sender.sent

    def frozen_inside_gradient(member: WorkerProcess, via: WorkerProcess) -> int:
        """Rounds of all three (the member serving meanwhile) until `member` is frozen inside its local
        gradient; where its log ends."""
        load = threading.Event()
        serving_load(member, checkpoint.name, load)
        try:
            for _ in range(5):
                offset = member.log.stat().st_size
                feedback_on([*everyone, member, member], via)
                frozen_at = freeze_inside_local_gradient(member, offset, timeout=60)
                if frozen_at is not None:
                    return frozen_at
                wait_trained(directory, set(sent))
        finally:
            load.set()
        raise AssertionError("the member's local gradient always ended before the test could stop it")

    def failed_and_reformed(survivors: list[WorkerProcess], failures: list[int]) -> list[str]:
        """The survivors' round failed and they re-formed without the member; their errors."""
        wait_members(2, survivors, timeout=90)
        states = [group_status(w) for w in survivors]
        for state, before in zip(states, failures, strict=True):
            assert int(state["failures"]) > before, state
        return [str(s["last_error"]) for s in states]

    try:
        start_all(everyone)
        wait_members(3, everyone)
        leader, victim = of_rank(everyone, 0), of_rank(everyone, 1)
        survivors = [w for w in everyone if w is not victim]
        feedback_on(everyone, leader)
        wait_trained(directory, set(sent))

        # kill -9 inside the gradient.
        failures = [int(group_status(w)["failures"]) for w in survivors]
        frozen_at = frozen_inside_gradient(victim, leader)
        victim.kill()
        assert victim.log.stat().st_size == frozen_at  # killed where it was frozen: nothing more was logged
        failed_and_reformed(survivors, failures)
        feedback_on(survivors, leader)
        wait_trained(directory, set(sent), timeout=120)  # the victim's feedback too, recomputed by a survivor
        victim.start()  # returns: loads the newest version, joins a generation of three again
        wait_members(3, everyone)
        assert victim.status()["head_version"] == store.latest_version()
        feedback_on(everyone, leader)
        wait_trained(directory, set(sent))

        # A stall inside the gradient: the others time out; the member returns when it resumes.
        failures = [int(group_status(w)["failures"]) for w in survivors]
        frozen_inside_gradient(victim, leader)
        errors = failed_and_reformed(survivors, failures)  # while it is still frozen
        assert stopped(victim)
        assert any("timed out" in e.lower() or "timeout" in e.lower() for e in errors), errors
        os.kill(victim.process.pid, signal.SIGCONT)  # type: ignore[union-attr]
        wait_members(3, everyone)
        assert group_status(victim)["failures"] >= 1
        assert victim.status()["head_version"] == store.latest_version()
        wait_serving(everyone, store.latest_version())
        feedback_on(everyone, leader)
        wait_trained(directory, set(sent), timeout=120)
        wait_until(lambda: pending_entries(redis_client) == 0, 30, "every entry acknowledged")
    finally:
        for worker in everyone:
            worker.stop()
    assert set(trained(directory)) == sent  # each exactly once, in one chain of versions
    recomputed = [directory.manifest(v).info.training["recomputed_because"] for v in directory.committed()]
    assert sum(r.get("other_replica", 0) for r in recomputed) >= 1, recomputed  # the dead one's feedback
    check_against_one_trainer(checkpoint, everyone[0].env, directory, store)
