"""The trainer of a data-parallel member: the local half of a round, then the step every member applies.

A round's update must equal one trainer stepping on the union of the members' samples. One trainer's step
uses the gradient of the mean loss over all loss units of its batch (response tokens; samples for KTO and
DPO); so each member computes the mean gradient over its own units (the usual step, in slices between engine
iterations, stopping before the optimizer), weights it by those units, and the sum over members divided by
the total units is that gradient. Every member then clips and steps its optimizer on the identical all-reduced tensor, from the
identical state (all restored the same committed version), so the weights stay bit-identical: the digests
members compare after each step say so, and a difference aborts the round instead of publishing.

A member without samples contributes zeros. A parameter no member's samples reached keeps `.grad` None, as it
would on one trainer (AdamW would otherwise still move it through weight decay and its moments).
"""

from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from alchemist_worker.continual.rehearsal import RehearsalEntry
from alchemist_worker.continual.trainable_weights import TrainableWeights
from alchemist_worker.continual.trainer import ContinualTrainer, StepResult
from alchemist_worker.feedback.samples import TrainingSample


@dataclass(frozen=True)
class AppliedStep:
    lr: float
    step: int  # optimizer steps so far
    digest: str  # sha256 of the training weights after the step ("" when not verified)


def same_initial_adapters(weights: TrainableWeights, seed: int = 0) -> None:
    """Version 0 must be the same on every member: LoRA's A starts random (Kaiming-uniform, as in PEFT), so it
    is drawn from a generator seeded by the weight's name instead of from the process's RNG."""
    generator = torch.Generator()
    for name, tensor in weights.initial.items():
        if name.endswith("lora_A"):
            generator.manual_seed(seed + zlib.crc32(name.encode()))
            fresh = torch.empty(tensor.shape, dtype=tensor.dtype)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            weights.initial[name] = fresh.to(tensor.device)
    weights.load_training(weights.initial)


class DataParallelTrainer(ContinualTrainer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        same_initial_adapters(self.weights)
        # The generation's leader adds the round's rehearsal draw to its local batch (every member holds the
        # same buffer, so one draw per round, as one trainer draws once per step).
        self.leads = False

    def rehearses(self) -> bool:
        """Whether this member's local gradient includes rehearsed answers this round."""
        return self.leads and self.settings.rehearsal_samples > 0 and len(self.rehearsal) > 0

    def _rehearsed(self) -> list[TrainingSample]:
        return super()._rehearsed() if self.leads else []

    def _can_step(self, samples: list[TrainingSample]) -> bool:
        return bool(samples) or self.rehearses()

    def _step(self, samples: list[TrainingSample]) -> StepResult:
        """The local gradient only: `.grad` holds the mean gradient over these samples' loss units (response
        tokens, or samples for the sequence-level objectives), whose count goes in `extra["units"]`."""
        rehearsed = self._rehearsed()
        reports, own_reasons, total = self._accumulate(samples + rehearsed)
        result = self._result(samples, reports, own_reasons, total, lr=0.0)
        result.extra["units"] = total
        result.extra["rehearsed"] = len(rehearsed)
        return result

    def trained(self, answers: list[RehearsalEntry]) -> None:
        """Engine thread: every member's desirable answers of a round, in rank order (the same on every
        member), to be admitted to the rehearsal buffer with the version that covers them."""
        self.unadmitted += answers

    def contribution(self, units: int) -> torch.Tensor:
        """[sum of unit-weighted gradients..., one flag per parameter that has a gradient], flat, fp32+.

        Engine thread. Zeros (and flags 0) for a member without samples or whose step failed.
        """
        params = self.weights.parameters()
        dtype = torch.promote_types(params[0].dtype, torch.float32)
        parts = []
        flags = []
        for param in params:
            grad = param.grad if units > 0 else None
            if grad is None:
                parts.append(torch.zeros(param.numel(), dtype=dtype, device=param.device))
            else:
                parts.append(grad.detach().reshape(-1).to(dtype) * units)
            flags.append(0.0 if grad is None else 1.0)
        parts.append(torch.tensor(flags, dtype=dtype, device=params[0].device))
        return torch.cat(parts)

    def discard_gradient(self) -> None:
        for param in self.weights.parameters():
            param.grad = None

    def apply(self, summed: torch.Tensor, total_units: int, verify: bool) -> AppliedStep:
        """Engine thread: `.grad` = the all-reduced sum / total units; clip, step; the weights' digest."""
        if total_units <= 0:
            raise ValueError("a round without loss units has no step to apply")
        params = self.weights.parameters()
        flags = summed[-len(params) :]
        offset = 0
        with torch.no_grad():
            for param, flag in zip(params, flags.tolist(), strict=True):
                n = param.numel()
                if flag > 0:
                    chunk = summed[offset : offset + n].to(device=param.device) / total_units
                    param.grad = chunk.reshape(param.shape).to(param.dtype)
                else:
                    param.grad = None
                offset += n
        lr = self._optimizer_step()
        return AppliedStep(lr=lr, step=self.step_count, digest=self.weights_digest() if verify else "")

    def weights_digest(self) -> str:
        digest = hashlib.sha256()
        for name, tensor in sorted(self.weights.snapshot().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()
