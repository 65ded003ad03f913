"""Rehearsal and held versions in data-parallel rounds (CPU, gloo, real Redis, two worker processes).

The leader draws each round's rehearsal from the buffer every member holds identically; the buffer a version
carries is exactly the desirable answers of the versions it descends from that the gate passed; after a held
version every member continues from its parent, at the learning rate the holds in a row from it give.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.schemas import GateDecision
from alchemist_worker.versions.artifacts import read_trainer_state
from alchemist_worker.versions.directory import VersionDirectory

from tests.worker.distributed.group_processes import (
    KEYS,
    FeedbackSender,
    group_worker,
    start_all,
    wait_members,
)
from tests.worker.distributed.one_trainer_reference import wait_trained
from tests.worker.distributed.test_data_parallel import GENERAL_TEXT

pytestmark = pytest.mark.slow

REHEARSE = 3


def run_rounds(
    tiny_checkpoints: dict[str, Path], redis_url: str, redis_client: redis.Redis, tmp_path: Path, **env: str
) -> VersionDirectory:
    checkpoint = tiny_checkpoints["llama"]
    directory = VersionDirectory(tmp_path / "versions")
    env = {
        "ALCHEMIST_TRAINING_MIN_BATCH_SIZE": "2",
        "ALCHEMIST_TRAINING_MAX_WAIT_SECONDS": "1.0",
        "ALCHEMIST_TRAINING_REHEARSAL_SAMPLES": str(REHEARSE),
        "ALCHEMIST_FEEDBACK_CLAIM_IDLE_MS": "30000",
        **env,
    }
    workers = [
        group_worker(checkpoint, redis_url, directory.root, tmp_path, f"g{n}", **env) for n in range(2)
    ]
    sender = FeedbackSender(JobStore(redis_client, KEYS), checkpoint.name)
    try:
        start_all(workers)
        wait_members(2, workers)
        for _ in range(4):
            sender.on(workers, via=workers[0])  # one request served by each member per round
            wait_trained(directory, set(sender.sent))
    finally:
        for worker in workers:
            worker.stop()
    return directory


def check_guards(directory: VersionDirectory) -> list[int]:
    """Checks every version against what the rules say it must carry; returns the versions that passed."""
    infos = {v: directory.manifest(v).info for v in directory.committed()}
    feedback = {v: {fb.feedback_id for fb in directory.manifest(v).feedback} for v in infos}
    passed = [v for v, info in infos.items() if info.evaluation is None or not info.held]
    for version, info in infos.items():
        newest_passed = max((v for v in passed if v < version), default=0)
        assert info.parent == newest_passed, (version, info.parent, passed)  # never a held parent
        ancestors, at = [], info.parent
        while at:
            ancestors.append(at)
            at = infos[at].parent
        state = read_trainer_state(directory.path(version))
        assert state is not None
        buffer = {entry[0] for entry in state["rehearsal"]["entries"]}
        assert buffer == set().union(*(feedback[a] for a in ancestors if a in passed)), version
        assert {entry[0] for entry in state["unadmitted"]} == feedback[version]
        assert info.training["rehearsed"] == min(REHEARSE, len(buffer)), version
    return passed


def test_rounds_rehearse_the_answers_of_earlier_versions(
    tiny_checkpoints: dict[str, Path], redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    directory = run_rounds(tiny_checkpoints, redis_url, redis_client, tmp_path)
    passed = check_guards(directory)
    assert passed == directory.committed()  # no gate: every version passes
    assert len(passed) >= 3
    assert directory.manifest(passed[-1]).info.training["rehearsed"] == REHEARSE


def test_after_a_held_round_every_member_continues_from_its_parent(
    tiny_checkpoints: dict[str, Path], redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("\n".join(json.dumps({"text": text}) for text in GENERAL_TEXT))
    directory = run_rounds(
        tiny_checkpoints, redis_url, redis_client, tmp_path,
        ALCHEMIST_TRAINING_OPTIMIZER="sgd",
        ALCHEMIST_TRAINING_LEARNING_RATE="0.5",  # large: some candidates regress on general text
        ALCHEMIST_EVALUATION_SET=str(eval_path),
        ALCHEMIST_EVALUATION_MAX_PERPLEXITY_INCREASE="0",
        ALCHEMIST_DP_ROUND_TIMEOUT_SECONDS="20",  # the members wait for the leader's scoring
    )  # fmt: skip
    check_guards(directory)
    decisions = [directory.manifest(v).info.evaluation for v in directory.committed()]
    assert all(reading is not None for reading in decisions)
    assert any(reading.decision is GateDecision.HELD for reading in decisions if reading is not None)
    # Each candidate held in a row from one parent halves the next one's learning rate (the default backoff);
    # every member derived it from the published versions (their weights' digests agreed, or no version).
    holds: dict[int, int] = {}
    rates = []
    for version in directory.committed():
        info = directory.manifest(version).info
        expected = 0.5 * 0.5 ** holds.get(info.parent, 0)
        assert info.training["learning_rates"] == [pytest.approx(expected)] * len(info.training["steps"]), (
            version
        )
        rates.append(expected)
        holds[info.parent] = holds.get(info.parent, 0) + 1 if info.held else 0
    assert min(rates) < 0.5, "a version was trained after a hold"
