"""The round's arithmetic without processes: members' unit-weighted gradients, summed as the all-reduce sums
them, then the identical step, against one plain trainer stepping on the union of the samples (in-process,
recompute path, the tiny checkpoint). Fails if members were weighted equally instead of by their units."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from alchemist_worker.activations.store import ActivationStore, StoreConfig
from alchemist_worker.continual.settings import Optimizer, TrainerSettings
from alchemist_worker.continual.trainable_weights import TrainableWeights
from alchemist_worker.continual.trainer import ContinualTrainer
from alchemist_worker.distributed.trainer import DataParallelTrainer, same_initial_adapters
from alchemist_worker.feedback.samples import TrainingSample
from alchemist_worker.model.checkpoint import load_model

SETTINGS = TrainerSettings(lora_rank=4, learning_rate=0.05, optimizer=Optimizer.SGD)


def samples(count: int, seed: int) -> list[TrainingSample]:
    rng = random.Random(seed)
    out = []
    for n in range(count):
        prompt = tuple(rng.randrange(3, 400) for _ in range(rng.randrange(3, 12)))
        response = tuple(rng.randrange(3, 400) for _ in range(rng.randrange(1, 9)))  # uneven units
        out.append(TrainingSample(f"fb-{seed}-{n}", f"req-{seed}-{n}", prompt, response, 0, "nobody", False))
    return out


def trainer(checkpoint: Path, kind: type[ContinualTrainer]) -> ContinualTrainer:
    model = load_model(checkpoint, dtype=torch.float32, device=torch.device("cpu"))
    weights = TrainableWeights(model, SETTINGS)
    same_initial_adapters(weights)
    return kind(model, weights, ActivationStore(StoreConfig()), SETTINGS, "member")


def round_of(members: list[DataParallelTrainer], splits: list[list[TrainingSample]]) -> None:
    results = [m._step(split) if split else None for m, split in zip(members, splits, strict=True)]
    units = [int(r.extra["units"]) if r is not None else 0 for r in results]
    summed = torch.stack([m.contribution(u) for m, u in zip(members, units, strict=True)]).sum(0)
    for member in members:
        member.apply(summed, sum(units), verify=False)


@pytest.mark.parametrize("sizes", [(2, 5), (3, 0, 4)])
def test_members_step_as_one_trainer_on_the_union(
    tiny_checkpoints: dict[str, Path], sizes: tuple[int, ...]
) -> None:
    checkpoint = tiny_checkpoints["llama"]
    splits = [samples(n, seed) for seed, n in enumerate(sizes)]
    members = [trainer(checkpoint, DataParallelTrainer) for _ in sizes]
    one = trainer(checkpoint, ContinualTrainer)
    for _ in range(2):  # the second round starts from non-zero adapters B: every weight moves
        round_of(members, splits)  # type: ignore[arg-type]
        one._step([s for split in splits for s in split])
    digests = {m.weights_digest() for m in members}  # type: ignore[attr-defined]
    assert len(digests) == 1  # bit-identical members (a member without samples included)
    reference = one.weights.snapshot()
    initial = one.weights.initial
    got = members[0].weights.snapshot()
    names = sorted(reference)
    expected_update = torch.cat([(reference[n] - initial[n]).flatten() for n in names])
    update = torch.cat([(got[n] - initial[n]).flatten() for n in names])
    error = float((update - expected_update).norm() / expected_update.norm())
    assert error < 1e-5, error
