"""Data-parallel training with real worker processes, gloo, and the real Redis.

Every version is checked against a reference nobody here wrote the math of twice: one plain `ContinualTrainer`
(the one-replica path) restored from the version's parent and stepped once on the union of the version's
samples must give the version's weights within fp32 tolerance, however the round split the samples among
members. The members' digests after each step must be equal (the published version is byte for byte what
every member holds), every feedback id must be trained exactly once, and, since each member trains the
feedback on the requests it served, every sample must reuse its prefill record.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
import torch
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.schemas import GateDecision
from alchemist_worker.continual.settings import TrainerSettings
from alchemist_worker.continual.trainable_weights import TrainableWeights
from alchemist_worker.engine.serving_tokenizer import ServingTokenizer
from alchemist_worker.evaluation.candidate import CandidateEvaluation
from alchemist_worker.evaluation.gate import GateBounds
from alchemist_worker.evaluation.settings import EvaluationSettings
from alchemist_worker.model.checkpoint import load_model
from alchemist_worker.versions.directory import VersionDirectory

from tests.worker.continual.conftest import wait_until
from tests.worker.distributed.group_processes import (
    KEYS,
    ROUND_PER_BATCH_SGD,
    FeedbackSender,
    accept,
    group_status,
    group_worker,
    held_by,
    of_rank,
    pending_entries,
    serve,
    start_all,
    wait_members,
    wait_record,
    wait_serving,
)
from tests.worker.distributed.one_trainer_reference import check_against_one_trainer, trained, wait_trained

pytestmark = pytest.mark.slow


def test_members_train_as_one_trainer_and_survive_kill_9(
    tiny_checkpoints: dict[str, Path], redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Three members train their own feedback; kill -9 one holding feedback it has not committed yet, while
    the group's collectives run: the two others re-form, the dead one's feedback is claimed and recomputed by a
    survivor, and the member returns with the newest version. Then kill the leader right after a commit: a
    survivor takes the lease and leads on."""
    checkpoint = tiny_checkpoints["llama"]
    directory = VersionDirectory(tmp_path / "versions")
    everyone = [
        group_worker(checkpoint, redis_url, directory.root, tmp_path, f"r{n}", **ROUND_PER_BATCH_SGD)
        for n in range(3)
    ]
    store = JobStore(redis_client, KEYS)
    sender = FeedbackSender(store, checkpoint.name)
    feedback_on, sent = sender.on, sender.sent

    try:
        start_all(everyone)
        wait_members(3, everyone)
        leader, victim = of_rank(everyone, 0), of_rank(everyone, 1)
        survivors = [w for w in everyone if w is not victim]

        feedback_on(everyone + everyone, leader)  # one round of three members, two samples each
        wait_trained(directory, set(sent))
        handed = sum(int(group_status(w).get("handed_off", 0)) for w in everyone)
        wait_serving(everyone, 1)

        victims = feedback_on([victim, victim], leader)
        # Its feedback is pending under its consumer name from hand-off to commit: killed as soon as it
        # holds it, it dies before committing it, inside the group's collectives (an idle group all-reduces
        # every poll). Timing the kill on its gradient is not reliable here: status polls over HTTP take
        # longer than a round on a loaded machine.
        wait_until(lambda: held_by(redis_client, victim) >= len(victims), 30, "the victim's feedback")
        victim.kill()
        feedback_on(survivors, leader)
        wait_trained(directory, set(sent), timeout=90)  # its feedback too, recomputed by a survivor
        wait_members(2, survivors)

        victim.start()  # returns: loads the newest version, joins a generation of three again
        wait_members(3, everyone)
        assert victim.status()["head_version"] == store.latest_version()
        wait_serving(everyone, store.latest_version())
        feedback_on(everyone, leader)
        wait_trained(directory, set(sent))

        before = set(directory.committed())
        wait_serving(everyone, store.latest_version())
        feedback_on(everyone, leader)
        wait_until(lambda: set(directory.committed()) - before != set(), 60, "a commit")
        leader.kill()  # right after a commit: its round's feedback was acknowledged by that commit
        rest = [w for w in everyone if w is not leader]
        wait_members(2, rest)
        feedback_on(rest, rest[0])
        wait_trained(directory, set(sent), timeout=90)

        rolled_back_from = store.latest_version()
        generation = int(group_status(rest[0])["generation"])
        store.request_rollback(1, "test")  # the leader re-forms the group, which restores version 1

        def regrouped() -> bool:
            states = [group_status(w) for w in rest]
            return all(
                int(s.get("generation") or 0) > generation and s.get("world_size") == 2 for s in states
            )

        wait_until(regrouped, 30, "a generation from version 1")
        wait_serving(rest, 1)  # `latest` followers serve the rollback's target
        feedback_on(rest, rest[0])
        wait_trained(directory, set(sent))
        wait_until(lambda: store.feedback_lag().entries == 0, 30, "every entry acknowledged")
    finally:
        for worker in everyone:
            worker.stop()
    assert set(trained(directory)) == sent  # each exactly once, in one chain of versions
    after = directory.manifest(rolled_back_from + 1).info
    assert after.parent == 1 and after.training["reused"] == 2, after.training  # records made under v1
    assert pending_entries(redis_client) == 0
    first = directory.manifest(1).info.training
    assert first["reused"] == 6 and first["data_parallel"]["samples"] == {"r0": 2, "r1": 2, "r2": 2}, first
    assert handed > 0  # feedback read by another member was handed to the one that served it
    recomputed = [directory.manifest(v).info.training["recomputed_because"] for v in directory.committed()]
    assert sum(r.get("other_replica", 0) for r in recomputed) >= len(victims), recomputed
    checked = check_against_one_trainer(checkpoint, everyone[0].env, directory, store)
    assert {len(m) for m in checked} == {2, 3}, checked  # versions of three and of two members


GENERAL_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Operators reconcile custom resources into pods, services and config maps.",
    "def add(a, b):\n    return a + b",
]


def test_the_evaluation_gate_judges_every_round(
    tiny_checkpoints: dict[str, Path], redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """With an evaluation set, the leader scores each round's candidate before committing it, as one trainer
    does: every version carries the gate's reading, whose scores are those of the published weights (scored
    here again, independently of the members), and a held version is never served."""
    checkpoint = tiny_checkpoints["llama"]
    directory = VersionDirectory(tmp_path / "versions")
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("\n".join(json.dumps({"text": text}) for text in GENERAL_TEXT))
    env = {
        "ALCHEMIST_TRAINING_MIN_BATCH_SIZE": "4",
        "ALCHEMIST_TRAINING_MAX_WAIT_SECONDS": "1.0",
        "ALCHEMIST_TRAINING_OPTIMIZER": "sgd",
        "ALCHEMIST_TRAINING_LEARNING_RATE": "0.5",  # large: some candidates regress on general text
        "ALCHEMIST_EVALUATION_SET": str(eval_path),
        "ALCHEMIST_EVALUATION_MAX_PERPLEXITY_INCREASE": "0",
        "ALCHEMIST_DP_ROUND_TIMEOUT_SECONDS": "20",  # the members wait for the leader's scoring
        "ALCHEMIST_FEEDBACK_CLAIM_IDLE_MS": "30000",
    }
    workers = [
        group_worker(checkpoint, redis_url, directory.root, tmp_path, f"g{n}", **env) for n in range(2)
    ]
    store = JobStore(redis_client, KEYS)
    sent: set[str] = set()
    try:
        start_all(workers)
        wait_members(2, workers)
        for round_ in range(3):
            served = [serve(w, checkpoint.name, 10 * round_ + n) for n, w in enumerate(workers + workers)]
            for response_id in served:
                wait_record(store, response_id)
                accept(workers[0], response_id)
            sent.update(f"fb-{rid}" for rid in served)
            wait_trained(directory, set(sent))
        readings = {v: directory.manifest(v).info.evaluation for v in directory.committed()}
        passed = [v for v, r in readings.items() if r is not None and r.decision is GateDecision.PASSED]
        wait_serving(workers, max(passed, default=0))  # `latest` followers skip held versions
    finally:
        for worker in workers:
            worker.stop()

    tokenizer = ServingTokenizer.from_pretrained(checkpoint)
    gate = CandidateEvaluation.load(
        EvaluationSettings(eval_path, GateBounds(max_perplexity_increase=0)),
        lambda text: tokenizer.inner.encode(text, add_special_tokens=False),
        tokenizer.apply_chat_template,
        max_model_len=512,
    )
    assert gate is not None
    model = load_model(checkpoint, dtype=torch.float32, device=torch.device("cpu"))
    settings = TrainerSettings.from_env({**workers[0].env, **env})
    weights = TrainableWeights(model, settings, base_model=str(checkpoint))
    weights.install(weights.base_serving_set())
    base = gate.score(model, torch.device("cpu"))
    assert len(readings) >= 2, readings
    for version, reading in readings.items():
        assert reading is not None, f"version {version} was published without the gate's reading"
        assert reading.parent == directory.manifest(version).info.parent
        weights.load_training(weights.read(directory.path(version)))
        weights.use_training()
        scores = gate.score(model, torch.device("cpu"))
        assert reading.scores.perplexity == pytest.approx(scores.perplexity, rel=1e-5), version
        assert reading.base.perplexity == pytest.approx(base.perplexity, rel=1e-5)
        floor = min(base.perplexity or 0, (reading.parent_scores or reading.base).perplexity or 0)
        regressed = (scores.perplexity or 0) > floor  # the bound is 0: any increase is a regression
        assert (reading.decision is GateDecision.HELD) == regressed, (version, reading)
    assert any(r is not None and r.decision is GateDecision.HELD for r in readings.values()), readings
