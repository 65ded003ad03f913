"""`publish_every_steps` in data-parallel mode: every round steps every member, every N-th round is a version.

With N = 2, two members, then a third: the feedback of a round that no version covers yet stays pending
(unacknowledged) in Redis; each version holds N rounds and equals one plain trainer stepping once per round on
the round's samples; when the group re-forms between two versions (a member joins), every member drops its
uncommitted round, restores the newest version, and the dropped feedback is trained again in the new
generation: in the end every feedback id is in exactly one version, and each version's optimizer steps follow
its parent's (the dropped round's step is in none of them).
"""

from __future__ import annotations

from pathlib import Path

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
)
from tests.worker.distributed.one_trainer_reference import (
    check_against_one_trainer,
    check_steps_follow_parents,
    trained,
)

pytestmark = pytest.mark.slow
ROUNDS_PER_VERSION = 2


def test_every_second_round_is_a_version_and_a_regroup_drops_the_uncommitted_round(
    tiny_checkpoints: dict[str, Path], redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    checkpoint = tiny_checkpoints["llama"]
    directory = VersionDirectory(tmp_path / "versions")
    env = {
        **ROUND_PER_BATCH_SGD,
        "ALCHEMIST_TRAINING_PUBLISH_EVERY_STEPS": str(ROUNDS_PER_VERSION),
        # Nothing recorded, every sample recomputed: a version's second round is then exact too (a record
        # reused there would have been made under the weights before the version's first round).
        "ALCHEMIST_RECORD_POLICY": "off",
    }
    workers = [
        group_worker(checkpoint, redis_url, directory.root, tmp_path, f"p{n}", **env) for n in range(3)
    ]
    first_two, joining = workers[:2], workers[2]
    store = JobStore(redis_client, KEYS)
    sender = FeedbackSender(store, checkpoint.name)
    feedback_on, sent = sender.on, sender.sent

    def settled(group: list[WorkerProcess]) -> dict[str, int]:
        """Waits until every feedback id sent is in a version or in a round kept for the next one; then
        checks that the kept rounds' feedback is exactly what Redis still holds unacknowledged."""

        def accounted() -> bool:
            in_versions = len(trained(directory))  # first: a commit in between only makes the sum smaller
            return in_versions + int(group_status(group[0])["uncommitted_samples"]) == len(sent)

        wait_until(accounted, 90, f"{len(sent)} feedback ids in versions or kept rounds")
        states = [group_status(w) for w in group]
        kept = {int(s["uncommitted_rounds"]) for s in states}
        assert len(kept) == 1, states  # every member keeps the same rounds
        assert kept.pop() < ROUNDS_PER_VERSION, states
        uncommitted = len(sent) - len(trained(directory))
        assert int(states[0]["uncommitted_samples"]) == uncommitted, states
        assert pending_entries(redis_client) == uncommitted  # held, not acknowledged, until a version
        return states[0]

    try:
        start_all(first_two)
        wait_members(2, first_two)
        leader = of_rank(first_two, 0)

        # Rounds of two members until a version of two rounds is out and the next round is kept (usually
        # three batches: a batch of feedback is one round).
        for _ in range(6):
            feedback_on(first_two + first_two, leader)
            state = settled(first_two)
            versions = len(directory.committed())
            assert state["rounds"] == ROUNDS_PER_VERSION * versions + state["uncommitted_rounds"], state
            if versions and state["uncommitted_rounds"]:
                break
        assert versions and state["uncommitted_rounds"] == 1, state
        dropped = sent - set(trained(directory))
        generation = int(state["generation"])

        joining.start()  # the group re-forms: every member drops its kept round and restores the newest version
        wait_members(3, workers)
        assert all(int(group_status(w)["generation"]) > generation for w in workers)
        assert joining.status()["head_version"] == store.latest_version()

        # The dropped feedback trains again; more rounds of three until everything is in a version.
        for _ in range(6):
            feedback_on(workers, leader)
            state = settled(workers)
            if state["uncommitted_rounds"] == 0:
                break
        assert state["uncommitted_rounds"] == 0, state
    finally:
        for worker in workers:
            worker.stop()
    versions = trained(directory)  # each feedback id exactly once, one chain
    assert set(versions) == sent
    assert pending_entries(redis_client) == 0
    for (
        feedback_id
    ) in dropped:  # retrained after the re-form, not committed by the generation that dropped it
        info = directory.manifest(versions[feedback_id]).info
        assert info.training["data_parallel"]["generation"] > generation, (feedback_id, info.training)
    check_steps_follow_parents(directory, ROUNDS_PER_VERSION)
    checked = check_against_one_trainer(checkpoint, workers[0].env, directory, store)
    assert len(checked) == len(directory.committed())  # every version: all samples were recomputed
    assert {len(m) for m in checked} == {2, 3}, checked
