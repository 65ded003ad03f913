"""Sampler: greedy, temperature, top-k, top-p, seeds, penalties and log probabilities."""

from __future__ import annotations

import pytest
import torch
from alchemist_worker.engine.sampler import filtered_probs, sample, seeded_generator
from alchemist_worker.engine.sampling_params import InvalidParameter, SamplingParams

CPU = torch.device("cpu")


def logits_rows(rows: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_per_row() -> None:
    logits = logits_rows(4)
    params = [SamplingParams(temperature=0.0)] * 4
    ids, lps = sample(logits, params, [[]] * 4, [None] * 4)
    assert ids == logits.argmax(-1).tolist()
    assert lps == [None] * 4


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = logits_rows(3)
    for p in (SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6)):
        ids, _ = sample(logits, [p] * 3, [[]] * 3, [None] * 3)
        assert ids == logits.argmax(-1).tolist()


def test_top_k_and_top_p_support() -> None:
    logits = logits_rows(1, vocab=20)[0]
    probs = filtered_probs(logits.unsqueeze(0), [SamplingParams(top_k=5)])[0]
    assert int((probs > 0).sum()) == 5
    assert set(probs.nonzero().flatten().tolist()) == set(logits.topk(5).indices.tolist())
    top_p = 0.7
    probs = filtered_probs(logits.unsqueeze(0), [SamplingParams(top_p=top_p)])[0]
    full = torch.softmax(logits, -1).sort(descending=True).values
    keep = int((full.cumsum(0) - full < top_p).sum())  # smallest prefix reaching top_p
    assert int((probs > 0).sum()) == keep
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-5)


def test_sampling_follows_the_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    params = [SamplingParams(temperature=0.8)]
    gen = seeded_generator(1, CPU)
    counts = torch.zeros(4)
    n = 4000
    for _ in range(n):
        ids, _ = sample(logits, params, [[]], [gen])
        counts[ids[0]] += 1
    expected = torch.softmax(logits[0] / 0.8, -1) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.3  # p = 0.001 for 3 degrees of freedom


def test_seed_makes_row_independent_of_batch() -> None:
    logits = logits_rows(3, seed=3)
    p_seeded = SamplingParams(temperature=1.0, seed=42)
    alone = sample(logits[1:2], [p_seeded], [[]], [seeded_generator(42, CPU)])[0][0]
    gen = seeded_generator(42, CPU)
    batched, _ = sample(
        logits, [SamplingParams(temperature=1.0), p_seeded, SamplingParams()], [[]] * 3, [None, gen, None]
    )
    assert batched[1] == alone


def test_penalties_discourage_repeats() -> None:
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    ids, _ = sample(logits, [SamplingParams(temperature=0.0, frequency_penalty=0.5)], [[0]], [None])
    assert ids == [1]
    ids, _ = sample(logits, [SamplingParams(temperature=0.0, presence_penalty=0.05)], [[0, 0]], [None])
    assert ids == [0]  # presence counts once: 1.0 - 0.05 > 0.9


def test_logprobs_are_raw_log_softmax() -> None:
    logits = logits_rows(2)
    ids, lps = sample(
        logits, [SamplingParams(temperature=0.0, logprobs=3), SamplingParams()], [[]] * 2, [None] * 2
    )
    ref = torch.log_softmax(logits[0], -1)
    first = lps[0]
    assert first is not None and lps[1] is None
    assert first.token_id == ids[0] and first.logprob == pytest.approx(float(ref[ids[0]]))
    assert [t for t, _ in first.top] == ref.topk(3).indices.tolist()


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(logprobs=21), "logprobs"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(stop=("",)), "stop"),
        (dict(stop_token_ids=(-1,)), "stop_token_ids"),
    ],
)
def test_invalid_params_name_the_field(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidParameter) as err:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert err.value.param == param
