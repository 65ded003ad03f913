"""The per-sample loss of a feedback sample from its response tokens' log-probabilities and its label.

Every label teaches something under the objectives past `supervised`:
- `supervised`: cross-entropy on accepted and corrected answers (imitation); rejected answers train nothing.
- `unlikelihood`: the same, plus -sum log(1 - p(token)) on a rejected answer's tokens (Welleck et al. 2019):
  the model is pushed away from what it said, token by token, without a reference model. The answer a
  correction replaced is not pushed down on the tokens the correction itself uses: a wrong answer shares words
  with its correction ("The Alchemist project is ..." against "The codename of the Alchemist project is ..."),
  and pushing those down fights the imitation of the correction (Welleck et al. likewise keep the target token
  out of the negative candidates). Spared tokens still count in the step's mean.
- `kto`: Kahneman-Tversky optimization on unpaired labels (Ethayarajh et al. 2024). With the sequence's log
  ratio r = log pi(y|x) - log pi_ref(y|x) and the reference point z0, a desirable answer costs
  lambda_D (1 - sigmoid(beta (r - z0))), an undesirable one lambda_U (1 - sigmoid(beta (z0 - r))).
- `dpo`: direct preference optimization (Rafailov et al. 2023) on the pairs that exist: a correction is preferred
  to the answer it corrects, -log sigmoid(beta ((r_chosen) - (r_rejected))). Samples without a partner (plain
  accepts and rejections) get the KTO terms, so no label is dropped.

Token-level objectives (`supervised`, `unlikelihood`) sum over tokens and are averaged over the step's response
tokens; sequence-level ones (`kto`, `dpo`) give one term per sample (a pair counts once) averaged over samples.
`loss_units` says what each sample counts for, so micro-batches and the two training paths add up exactly.

z0: the KTO paper estimates it from the policy's KL to the reference on mismatched pairs of the batch, with
gradients stopped. Here it is a constant of the configuration (0 by default, as TRL does without a KL batch):
a batch-dependent z0 would make one sample's loss depend on which micro-batch and path it landed in, and the
exact reuse path computes its backward before other samples are seen.

The optional forgetting guard adds kl_weight * KL(pi || pi_ref) per response token, over the whole
vocabulary, averaged like the objective (see `kl_to_reference`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


class Objective(enum.StrEnum):
    SUPERVISED = "supervised"
    UNLIKELIHOOD = "unlikelihood"
    KTO = "kto"
    DPO = "dpo"


class Label(enum.StrEnum):
    DESIRABLE = "desirable"  # an accepted answer, or a user's correction
    UNDESIRABLE = "undesirable"  # a rejected answer, or the answer a correction replaced


TOKEN_LEVEL = frozenset({Objective.SUPERVISED, Objective.UNLIKELIHOOD})
NEEDS_REFERENCE = frozenset({Objective.KTO, Objective.DPO})

# log(1 - p) is -inf at p = 1; tokens the policy is this sure of are clamped (their gradient is then zero).
_MAX_LOGPROB = math.log1p(-1e-6)


@dataclass(frozen=True)
class ObjectiveConfig:
    beta: float = 0.1  # KTO / DPO temperature of the log ratio
    desirable_weight: float = 1.0  # lambda_D (KTO), the weight of imitation (unlikelihood)
    undesirable_weight: float = 1.0  # lambda_U (KTO), the weight of the unlikelihood term
    kto_reference_point: float = 0.0  # z0, held constant (see the module docstring)
    kl_weight: float = 0.0  # forgetting guard: per-token KL to the reference; 0 turns it off

    def __post_init__(self) -> None:
        for name in ("beta",):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("desirable_weight", "undesirable_weight", "kto_reference_point", "kl_weight"):
            value = getattr(self, name)
            if not value >= 0 or math.isinf(value):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def trains_rejections(kind: Objective) -> bool:
    """Whether rejected answers (and the answers corrections replace) are training samples at all."""
    return kind is not Objective.SUPERVISED


def needs_reference(kind: Objective, config: ObjectiveConfig) -> bool:
    return kind in NEEDS_REFERENCE or config.kl_weight > 0


def loss_units(
    kind: Objective, lengths: Sequence[int], labels: Sequence[Label], pairs: Sequence[tuple[int, int]] = ()
) -> list[int]:
    """What each sample counts for in the step's mean: its response tokens (token-level objectives) or 1 per
    sample, a DPO pair once (on its chosen sample). Samples the objective does not train count 0."""
    kind, labels = Objective(kind), [Label(label) for label in labels]
    if kind in TOKEN_LEVEL:
        trained = (Label.DESIRABLE,) if kind is Objective.SUPERVISED else (Label.DESIRABLE, Label.UNDESIRABLE)
        return [n if label in trained else 0 for n, label in zip(lengths, labels, strict=True)]
    units = [1] * len(lengths)
    if kind is Objective.DPO:
        for _chosen, rejected in pairs:
            units[rejected] = 0
    return units


def spared_tokens(response_ids: Sequence[Tensor], pairs: Sequence[tuple[int, int]]) -> list[Tensor | None]:
    """Per sample, [r_i] bool: the tokens of a pair's undesirable answer that its desirable one also uses (not
    pushed down by unlikelihood); None for samples outside a pair and for desirable ones."""
    spared: list[Tensor | None] = [None] * len(response_ids)
    for chosen, rejected in pairs:
        spared[rejected] = torch.isin(response_ids[rejected], response_ids[chosen])
    return spared


def objective_loss(
    kind: Objective,
    policy_logprobs: Sequence[Tensor],
    reference_logprobs: Sequence[Tensor] | None,
    labels: Sequence[Label],
    config: ObjectiveConfig = ObjectiveConfig(),
    *,
    pairs: Sequence[tuple[int, int]] = (),
    spared: Sequence[Tensor | None] = (),
) -> Tensor:
    """Per-sample losses [n], in the units of `loss_units` (their sum divided by the units' is the mean).

    policy_logprobs[i]: [r_i] log pi(token | context) of sample i's response tokens, with their graph;
    reference_logprobs[i]: the same under the reference model, constants (needed by `kto` and `dpo`);
    pairs: (chosen, rejected) indices of DPO pairs, a desirable and an undesirable answer to one prompt;
    spared[i]: [r_i] bool, tokens of an undesirable answer that unlikelihood leaves alone (`spared_tokens`).
    """
    kind, labels = Objective(kind), [Label(label) for label in labels]
    n = len(policy_logprobs)
    if len(labels) != n or (reference_logprobs is not None and len(reference_logprobs) != n):
        raise ValueError("one label and one reference per sample")
    if n == 0:
        raise ValueError("no samples")
    device = policy_logprobs[0].device
    if kind in TOKEN_LEVEL:
        terms = []
        for i, (lp, label) in enumerate(zip(policy_logprobs, labels, strict=True)):
            lp = lp.float()
            if label is Label.DESIRABLE:
                term = -lp.sum()
                terms.append(term if config.desirable_weight == 1.0 else config.desirable_weight * term)
            elif kind is Objective.UNLIKELIHOOD:
                unlikely = _log1mexp(lp.clamp(max=_MAX_LOGPROB))
                keep = spared[i] if i < len(spared) else None
                if keep is not None:
                    unlikely = torch.where(keep.to(unlikely.device), torch.zeros_like(unlikely), unlikely)
                terms.append(-config.undesirable_weight * unlikely.sum())
            else:
                terms.append(lp.sum() * 0.0)  # keeps the graph whole; trains nothing
        return torch.stack(terms)
    if reference_logprobs is None:
        raise ValueError(f"objective {kind.value} needs the reference model's log-probabilities")
    ratios = torch.stack(
        [
            lp.float().sum() - ref.to(device=device, dtype=torch.float32).sum()
            for lp, ref in zip(policy_logprobs, reference_logprobs, strict=True)
        ]
    )  # [n] log pi(y|x) - log pi_ref(y|x)
    losses = kto_losses(ratios, labels, config)
    if kind is Objective.DPO and pairs:
        for chosen, rejected in pairs:
            if labels[chosen] is not Label.DESIRABLE or labels[rejected] is not Label.UNDESIRABLE:
                raise ValueError(f"pair ({chosen}, {rejected}) must be (desirable, undesirable)")
        chosen_idx = torch.tensor([c for c, _ in pairs], device=device)
        rejected_idx = torch.tensor([r for _, r in pairs], device=device)
        dpo = F.softplus(-config.beta * (ratios[chosen_idx] - ratios[rejected_idx]))  # -log sigmoid
        keep = torch.ones(n, dtype=torch.bool, device=device)
        keep[chosen_idx] = False
        keep[rejected_idx] = False
        losses = torch.where(keep, losses, torch.zeros_like(losses))
        losses = losses.index_add(0, chosen_idx, dpo)
    return losses


def kto_losses(ratios: Tensor, labels: Sequence[Label], config: ObjectiveConfig) -> Tensor:
    """[n] KTO terms from sequence log ratios [n]."""
    desirable = torch.tensor([label is Label.DESIRABLE for label in labels], device=ratios.device)
    z0 = config.kto_reference_point
    return torch.where(
        desirable,
        config.desirable_weight * (1.0 - torch.sigmoid(config.beta * (ratios - z0))),
        config.undesirable_weight * (1.0 - torch.sigmoid(config.beta * (z0 - ratios))),
    )


def kl_to_reference(policy_log_softmax: Tensor, reference_log_softmax: Tensor) -> Tensor:
    """[R] KL(pi || pi_ref) at each response position, over the vocabulary, from log-softmaxes [R, vocab].

    Exact rather than the sampled-token estimate (log pi - log pi_ref of the response token), so it is zero
    exactly when the two distributions agree, and never negative.
    """
    ref = reference_log_softmax.to(device=policy_log_softmax.device, dtype=torch.float32)
    return F.kl_div(ref, policy_log_softmax.float(), log_target=True, reduction="none").sum(-1)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
