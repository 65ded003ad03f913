"""Objectives: their math against the papers' formulas, the whole step against HF transformers, and the exact
reuse path against recomputation for each objective (and the KL guard)."""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.model.checkpoint import to_hf_name
from alchemist_worker.training.batch import TrainingSample
from alchemist_worker.training.objectives import (
    Label,
    Objective,
    ObjectiveConfig,
    kl_to_reference,
    loss_units,
    objective_loss,
    spared_tokens,
)
from alchemist_worker.training.reference import with_reference
from alchemist_worker.training.step import StepConfig, accumulate_gradients
from transformers import AutoModelForCausalLM

from tests.worker.training.conftest import (
    big_store,
    grads,
    make_samples,
    record_prompts,
    relative_error,
    trainable_model,
    zero_grads,
)

D, U = Label.DESIRABLE, Label.UNDESIRABLE
CONFIG = ObjectiveConfig(beta=0.5, desirable_weight=1.5, undesirable_weight=0.7)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_math_matches_the_papers_formulas() -> None:
    gen = torch.Generator().manual_seed(3)
    lengths = [3, 1, 4, 2]
    policy = [-torch.rand(n, generator=gen, dtype=torch.float64) * 3 for n in lengths]
    reference = [-torch.rand(n, generator=gen, dtype=torch.float64) * 3 for n in lengths]
    labels = [D, U, D, U]
    lp = [[float(x) for x in t] for t in policy]
    ref = [[float(x) for x in t] for t in reference]
    ratio = [sum(a) - sum(b) for a, b in zip(lp, ref, strict=True)]
    b, ld, lu = CONFIG.beta, CONFIG.desirable_weight, CONFIG.undesirable_weight

    sft = objective_loss(Objective.SUPERVISED, policy, None, labels, CONFIG)
    assert sft.tolist() == pytest.approx([-ld * sum(lp[0]), 0.0, -ld * sum(lp[2]), 0.0])

    # Welleck et al.: the unlikelihood of a token is -log(1 - p(token)).
    ul = objective_loss(Objective.UNLIKELIHOOD, policy, None, labels, CONFIG)
    expected = [-ld * sum(lp[0]), -lu * sum(math.log(1 - math.exp(x)) for x in lp[1])]
    expected += [-ld * sum(lp[2]), -lu * sum(math.log(1 - math.exp(x)) for x in lp[3])]
    assert ul.tolist() == pytest.approx(expected)

    # Ethayarajh et al.: v = lambda_D sigma(beta (r - z0)) or lambda_U sigma(beta (z0 - r)); loss lambda_y - v.
    for z0 in (0.0, 0.3):
        config = replace(CONFIG, kto_reference_point=z0)
        kto = objective_loss(Objective.KTO, policy, reference, labels, config)
        expected = [
            (ld - ld * sigmoid(b * (r - z0))) if y is D else (lu - lu * sigmoid(b * (z0 - r)))
            for r, y in zip(ratio, labels, strict=True)
        ]
        assert kto.tolist() == pytest.approx(expected)

    # Rafailov et al.: -log sigma(beta ((log pi_w - log ref_w) - (log pi_l - log ref_l))); the rest KTO.
    dpo = objective_loss(Objective.DPO, policy, reference, labels, CONFIG, pairs=[(2, 1)])
    pair = -math.log(sigmoid(b * (ratio[2] - ratio[1])))
    expected = [ld - ld * sigmoid(b * ratio[0]), 0.0, pair, lu - lu * sigmoid(-b * ratio[3])]
    assert dpo.tolist() == pytest.approx(expected)
    assert loss_units(Objective.DPO, lengths, labels, [(2, 1)]) == [1, 0, 1, 1]
    assert loss_units(Objective.UNLIKELIHOOD, lengths, labels) == lengths
    assert loss_units(Objective.SUPERVISED, lengths, labels) == [3, 0, 4, 0]


def test_kl_to_reference_is_the_kl_divergence() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(3, 11, generator=gen, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.randn(3, 11, generator=gen, dtype=torch.float64), -1)
    expected = [
        sum(math.exp(a) * (a - c) for a, c in zip(pr.tolist(), qr.tolist(), strict=True))
        for pr, qr in zip(p, q, strict=True)
    ]
    assert kl_to_reference(p, q).tolist() == pytest.approx(expected)
    assert kl_to_reference(p, p).abs().max().item() == 0.0


def test_unlikelihood_spares_the_tokens_of_the_correction() -> None:
    correction, replaced = torch.tensor([5, 6, 7]), torch.tensor([5, 9, 7, 5])
    spared = spared_tokens([torch.tensor([1]), correction, replaced], [(1, 2)])
    assert spared[0] is None and spared[1] is None
    assert spared[2] is not None and spared[2].tolist() == [True, False, True, True]
    policy = [torch.full((3,), -0.5, requires_grad=True), torch.full((4,), -0.5, requires_grad=True)]
    loss = objective_loss(
        Objective.UNLIKELIHOOD, policy, None, [D, U], pairs=[(0, 1)], spared=[None, spared[2]]
    )
    loss.sum().backward()
    grad = policy[1].grad
    assert grad is not None and grad.tolist()[0] == 0.0 and grad.tolist()[2:] == [0.0, 0.0]
    assert grad.tolist()[1] > 0  # descending it lowers the wrong token's log-probability


def test_unlikelihood_stays_finite_for_a_certain_token() -> None:
    policy = [torch.tensor([0.0, -1e-12, -5.0], requires_grad=True)]
    loss = objective_loss(Objective.UNLIKELIHOOD, policy, None, [U])
    loss.sum().backward()
    grad = policy[0].grad
    assert grad is not None and torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_invalid_uses_are_refused() -> None:
    policy = [torch.zeros(2), torch.zeros(2)]
    with pytest.raises(ValueError, match="reference"):
        objective_loss(Objective.KTO, policy, None, [D, U])
    with pytest.raises(ValueError, match="desirable, undesirable"):
        objective_loss(Objective.DPO, policy, policy, [U, D], pairs=[(0, 1)])
    with pytest.raises(ValueError, match="beta"):
        ObjectiveConfig(beta=0.0)
    with pytest.raises(ValueError, match="kl_weight"):
        ObjectiveConfig(kl_weight=-1.0)


def labelled_samples(vocab: int) -> list[TrainingSample]:
    """An accepted answer, a rejected one, and a correction paired with the answer it replaced (same prompt
    and record; they share the correction's first token, which unlikelihood spares), plus another accepted one."""
    s = make_samples(vocab)
    gen = torch.Generator().manual_seed(9)
    replaced_ids = torch.cat([torch.randint(0, vocab, (2,), generator=gen), s[2].response_ids[:1]])
    replaced = TrainingSample("s2/rejected", s[2].prompt_ids, replaced_ids, record_id=s[2].record_id)
    return [
        s[0],
        replace(s[1], label=U),
        replace(s[2], pair="p"),
        replace(replaced, label=U, pair="p"),
        s[3],
    ]


def with_constant_reference(samples: list[TrainingSample], vocab: int) -> list[TrainingSample]:
    gen = torch.Generator().manual_seed(5)
    out = []
    for s in samples:
        full = torch.log_softmax(torch.randn(s.response_len, vocab, generator=gen) * 2, -1)
        tokens = full.gather(1, s.response_ids[:, None]).squeeze(1)
        out.append(replace(s, reference_logprobs=tokens, reference_log_softmax=full))
    return out


def step_gradient(model, params, samples, objective, config, *, reuse: list[bool]):
    """Gradient of one step with the chosen samples' records in the store (the others recomputed)."""
    store = big_store()
    records = record_prompts(model, samples, RecordingPolicy.SELECTIVE)
    for s, r, keep in zip(samples, records, reuse, strict=True):
        if keep and s.record_id is not None and store.get(s.record_id) is None:
            store.put(s.record_id, r)
    zero_grads(params)
    step = StepConfig(objective=objective, objective_config=config, consume_records=False)
    report = accumulate_gradients(model, store, samples, version=0, config=step)
    assert report.reused == sum(1 for s in samples if s.record_id is not None and store.get(s.record_id))
    return report, grads(params)


OBJECTIVE_CASES = [
    (Objective.SUPERVISED, ObjectiveConfig()),
    (Objective.UNLIKELIHOOD, CONFIG),
    (Objective.KTO, CONFIG),
    (Objective.DPO, CONFIG),
    (Objective.SUPERVISED, ObjectiveConfig(kl_weight=0.3)),
    (Objective.KTO, replace(CONFIG, kl_weight=0.3)),
]


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize(("objective", "config"), OBJECTIVE_CASES, ids=lambda c: str(c))
def test_reuse_gradient_equals_recompute_for_each_objective(
    tiny_checkpoints: dict[str, Path], mode: str, objective: Objective, config: ObjectiveConfig
) -> None:
    model, params = trainable_model(tiny_checkpoints["llama"], mode)
    samples = with_constant_reference(labelled_samples(model.config.vocab_size), model.config.vocab_size)
    recomputed, ref = step_gradient(model, params, samples, objective, config, reuse=[False] * len(samples))
    reused, ours = step_gradient(model, params, samples, objective, config, reuse=[True] * len(samples))
    assert reused.loss == pytest.approx(recomputed.loss, rel=1e-5)
    assert all(g.abs().sum() > 0 for g in ref)
    assert relative_error(ours, ref) <= 1e-5
    # The pair's halves on different paths: the pair's record offered to one only.
    split = [replace(s, record_id=None) if s.sample_id == "s2/rejected" else s for s in samples]
    mixed, mixed_grads = step_gradient(model, params, split, objective, config, reuse=[True] * len(samples))
    assert mixed.reused == len(samples) - 1
    assert relative_error(mixed_grads, ref) <= 1e-5


def hf_token_logprobs(hf, sample: TrainingSample) -> torch.Tensor:
    """[r, vocab] log-softmax at the response's positions, from HF over prompt + response."""
    ids = torch.cat([sample.prompt_ids, sample.response_ids])[None]
    logits = hf(input_ids=ids).logits[0].float()
    p, r = sample.prompt_len, sample.response_len
    return torch.log_softmax(logits[p - 1 : p + r - 1], -1)


def hf_objective(hf, samples, objective: Objective, config: ObjectiveConfig) -> torch.Tensor:
    """The step's loss written out with HF log-probs and the papers' formulas (nothing from objectives.py)."""
    b, ld, lu, z0 = (
        config.beta,
        config.desirable_weight,
        config.undesirable_weight,
        config.kto_reference_point,
    )
    full = [hf_token_logprobs(hf, s) for s in samples]
    lp = [f.gather(1, s.response_ids[:, None]).squeeze(1) for f, s in zip(full, samples, strict=True)]
    ratio = [a.sum() - s.reference_logprobs.sum() for a, s in zip(lp, samples, strict=True)]
    terms, units = [], []
    for i, s in enumerate(samples):
        desirable = s.label is D
        if objective in (Objective.SUPERVISED, Objective.UNLIKELIHOOD):
            if desirable:
                term, unit = -ld * lp[i].sum(), s.response_len
            elif objective is Objective.UNLIKELIHOOD:
                # A replaced answer is not pushed down on the tokens its correction uses.
                partner = [o for o in samples if s.pair is not None and o.pair == s.pair and o is not s]
                used = set(partner[0].response_ids.tolist()) if partner else set()
                pushed = torch.tensor([t not in used for t in s.response_ids.tolist()])
                term, unit = -lu * (torch.log(1 - lp[i].exp()) * pushed).sum(), s.response_len
            else:
                continue
        elif objective is Objective.DPO and s.pair is not None:
            if not desirable:
                continue
            other = next(j for j, o in enumerate(samples) if o.pair == s.pair and j != i)
            term, unit = -torch.nn.functional.logsigmoid(b * (ratio[i] - ratio[other])), 1
        else:
            v = (
                ld * torch.sigmoid(b * (ratio[i] - z0))
                if desirable
                else lu * torch.sigmoid(b * (z0 - ratio[i]))
            )
            term, unit = (ld if desirable else lu) - v, 1
        if config.kl_weight:
            p = full[i]
            kl = (p.exp() * (p - s.reference_log_softmax)).sum()
            term = term + config.kl_weight * kl * unit / s.response_len
        terms.append(term)
        units.append(unit)
    return torch.stack(terms).sum() / sum(units)


@pytest.mark.parametrize(("objective", "config"), OBJECTIVE_CASES, ids=lambda c: str(c))
def test_step_matches_transformers(tiny_checkpoints: dict[str, Path], objective: Objective, config) -> None:
    path = tiny_checkpoints["llama"]
    model, _ = trainable_model(path, "full")
    samples = with_constant_reference(labelled_samples(model.config.vocab_size), model.config.vocab_size)
    store = big_store()
    for s, r in zip(samples, record_prompts(model, samples, RecordingPolicy.SELECTIVE), strict=True):
        store.put(str(s.record_id), r)
    step = StepConfig(objective=objective, objective_config=config, consume_records=False)
    report = accumulate_gradients(model, store, samples, version=0, config=step)
    assert report.reused == len(samples)

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    loss = hf_objective(hf, samples, objective, config)
    loss.backward()
    assert report.loss == pytest.approx(loss.item(), rel=1e-5)
    hf_params = dict(hf.named_parameters())
    ours = [p.grad for _, p in model.named_parameters()]
    ref = [hf_params[to_hf_name(name)].grad for name, _ in model.named_parameters()]
    assert all(g is not None for g in ours + ref)
    assert relative_error(ours, ref) <= 1e-5  # type: ignore[arg-type]


def test_reference_log_probs_are_those_of_transformers(tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints["llama"]
    model, _ = trainable_model(path, "full")
    samples = with_reference(model, make_samples(model.config.vocab_size), log_softmax=True)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for s in samples:
            full = hf_token_logprobs(hf, s)
            assert s.reference_log_softmax is not None and s.reference_logprobs is not None
            assert torch.allclose(s.reference_log_softmax, full, atol=1e-5)
            tokens = full.gather(1, s.response_ids[:, None]).squeeze(1)
            assert torch.allclose(s.reference_logprobs, tokens, atol=1e-5)


def test_kl_guard_is_zero_at_step_zero_and_grows_with_the_adapter(tiny_checkpoints: dict[str, Path]) -> None:
    """A fresh adapter (B = 0) is the base model: the KL to the base is 0 and leaves the loss and gradient as
    they are; once the adapter moves, the guard adds a positive penalty."""
    from alchemist_worker.model import load_model
    from alchemist_worker.training.lora import LoRAConfig, add_lora

    model = load_model(tiny_checkpoints["llama"], dtype=torch.float32)
    params = add_lora(model, LoRAConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "up_proj")))
    samples = with_reference(model, labelled_samples(model.config.vocab_size), log_softmax=True)
    plain, plain_grads = step_gradient(
        model, params, samples, Objective.SUPERVISED, ObjectiveConfig(), reuse=[True] * 5
    )
    guarded, guarded_grads = step_gradient(
        model, params, samples, Objective.SUPERVISED, ObjectiveConfig(kl_weight=1.0), reuse=[True] * 5
    )
    assert guarded.loss == pytest.approx(plain.loss, rel=1e-6)
    assert relative_error(guarded_grads, plain_grads) <= 1e-5
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)
    plain, _ = step_gradient(
        model, params, samples, Objective.SUPERVISED, ObjectiveConfig(), reuse=[True] * 5
    )
    guarded, _ = step_gradient(
        model, params, samples, Objective.SUPERVISED, ObjectiveConfig(kl_weight=1.0), reuse=[True] * 5
    )
    assert guarded.loss > plain.loss + 1e-4
