"""What every data-parallel version is checked against: one plain `ContinualTrainer` (the one-replica path),
restored from the version's parent and stepped once per round on the union of the round's samples, must give
the version's weights within fp32 tolerance, however the rounds split the samples among members. Also: every
feedback id in exactly one version, the versions one chain, each version's optimizer steps following its
parent's."""

from __future__ import annotations

from pathlib import Path

import torch
from alchemist_protocol.job_store import JobStore
from alchemist_worker.activations.store import ActivationStore, StoreConfig
from alchemist_worker.continual.settings import TrainerSettings
from alchemist_worker.continual.trainable_weights import TrainableWeights
from alchemist_worker.continual.trainer import ContinualTrainer
from alchemist_worker.distributed.trainer import same_initial_adapters
from alchemist_worker.feedback.samples import TrainingSample
from alchemist_worker.model.checkpoint import load_model
from alchemist_worker.versions.artifacts import read_trainer_state
from alchemist_worker.versions.directory import VersionDirectory

from tests.worker.continual.conftest import wait_until


def trained(directory: VersionDirectory) -> dict[str, int]:
    """feedback id -> the version that trained it; fails on one trained twice or a broken chain."""
    seen: dict[str, int] = {}
    versions = directory.committed()
    assert versions == list(range(1, len(versions) + 1)), f"versions are not one chain: {versions}"
    for version in versions:
        manifest = directory.manifest(version)
        assert manifest.info.parent < version  # version - 1, or a rollback's target
        for fb in manifest.feedback:
            assert fb.feedback_id not in seen, (
                f"{fb.feedback_id} trained in {seen[fb.feedback_id]} and {version}"
            )
            seen[fb.feedback_id] = version
    return seen


def wait_trained(directory: VersionDirectory, sent: set[str], timeout: float = 60) -> None:
    wait_until(lambda: set(trained(directory)) == sent, timeout, f"{len(sent)} feedback ids trained")


def steps_of(directory: VersionDirectory, version: int) -> list[int]:
    """The optimizer steps a version applied (the round numbers of its rounds)."""
    return [int(s) for s in directory.manifest(version).info.training["steps"]]


def check_steps_follow_parents(directory: VersionDirectory, rounds_per_version: int) -> None:
    """Every version holds `rounds_per_version` rounds, numbered on from its parent's last step: a round
    applied but dropped when the group re-formed left no step in any version's optimizer state."""
    for version in directory.committed():
        parent = directory.manifest(version).info.parent
        after = steps_of(directory, parent)[-1] if parent else 0
        expected = list(range(after + 1, after + rounds_per_version + 1))
        assert steps_of(directory, version) == expected, (version, steps_of(directory, version), expected)


def check_against_one_trainer(
    checkpoint: Path, env: dict[str, str], directory: VersionDirectory, store: JobStore
) -> list[list[str]]:
    """Each version == one plain trainer's steps from its parent, one per round on all the round's samples
    (fp32 tolerance), where every sample was exact (recomputed, or reused in a version's only round from a
    record made under the parent); the members of the versions checked."""
    settings = TrainerSettings.from_env(env)
    model = load_model(checkpoint, dtype=torch.float32, device=torch.device("cpu"))
    weights = TrainableWeights(model, settings, base_model=str(checkpoint))
    same_initial_adapters(weights)  # what every member starts version 0 from
    trainer = ContinualTrainer(model, weights, ActivationStore(StoreConfig()), settings, "reference")
    checked = []
    for version in directory.committed():
        info = directory.manifest(version).info
        dp = info.training["data_parallel"]
        assert len(set(dp["digests"].values())) == 1, f"members of version {version} differ: {dp['digests']}"
        feedback = directory.manifest(version).feedback
        per_round = [int(n) for n in dp.get("round_samples", [len(feedback)])]
        assert sum(per_round) == len(feedback), (version, per_round)
        parent = info.parent
        if parent == 0:
            tensors, state = weights.initial, None
        else:
            tensors, state = weights.read(directory.path(parent)), read_trainer_state(directory.path(parent))
        records = [store.get_request(fb.feedback_id.removeprefix("fb-")) for fb in feedback]
        exact_records = all(r is not None and r.version == parent for r in records) and len(per_round) == 1
        if info.training["reused"] and not exact_records:
            continue  # a record reused under newer weights gives an approximate gradient (DESIGN.md §3)
        checked.append(dp["members"])
        trainer.restore(parent, dict(tensors), state)
        samples = []
        for record in records:
            assert record is not None
            samples.append(
                TrainingSample(
                    feedback_id=f"fb-{record.request_id}",
                    request_id=record.request_id,
                    prompt_tokens=tuple(record.prompt_tokens),
                    response_tokens=tuple(record.response_tokens),
                    served_version=record.version,
                    served_by="nobody",  # recomputed here: the exact path gives the reuse path's gradient
                    corrected=False,
                )
            )
        taken = 0
        for count in per_round:
            trainer._step(samples[taken : taken + count])
            taken += count
        expected = weights.snapshot()
        published = weights.read(directory.path(version))
        names = sorted(expected)
        reference = torch.cat([(expected[n] - tensors[n]).flatten() for n in names])
        update = torch.cat([(published[n] - tensors[n]).flatten() for n in names])
        error = float((update - reference).norm() / reference.norm())
        assert reference.norm() > 0 and error < 1e-4, (
            f"version {version}: update differs by {error:.2e} (relative)"
        )
    return checked
