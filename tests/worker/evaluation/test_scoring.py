"""Evaluation scores: sliced equals one-shot, and the numbers are transformers' own."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from alchemist_worker.continual.step_cursor import StepCursor
from alchemist_worker.evaluation.eval_set import encode_eval_set, parse_eval_set
from alchemist_worker.evaluation.scoring import score_items
from alchemist_worker.model.checkpoint import load_model
from transformers import AutoModelForCausalLM, AutoTokenizer

SET = [
    {"text": "Online continual learning keeps improving a served model from user feedback, all day long."},
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"prompt": "Redis streams queue feedback;", "reference": " consumer groups deliver each entry"},
    {"messages": [{"role": "user", "content": "hello!"}], "reference": "hi, how can I help you today?"},
]


@pytest.fixture(scope="module")
def setup(tiny_checkpoints: dict[str, Path]):
    path = tiny_checkpoints["llama"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    eval_set = parse_eval_set("\n".join(json.dumps(i) for i in SET).encode(), "set")
    items = encode_eval_set(
        eval_set,
        lambda text: tokenizer.encode(text, add_special_tokens=False),
        lambda messages: list(
            tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        ),
        max_tokens=24,  # the first text is scored in windows
    )
    return path, load_model(path), items


def test_scores_in_slices_equal_the_one_shot_scores(setup) -> None:
    _, model, items = setup
    device = torch.device("cpu")
    once = score_items(model, device, items)
    cursor = StepCursor(lambda: score_items(model, device, items), yield_at_modules=list(model.layers))
    while not cursor.advance(1e-6):  # every yield point ends a slice
        pass
    assert cursor.slices > 3 * len(items)
    assert cursor.result() == once
    assert once.reference_items == 2 and once.text_tokens > 24


def test_scores_match_transformers(setup) -> None:
    path, model, items = setup
    ours = score_items(model, torch.device("cpu"), items)
    reference = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    text_nll = ref_nll = 0.0
    text_tokens = ref_tokens = exact = 0
    with torch.no_grad():
        for item in items:
            ids = torch.tensor([item.context + item.targets])
            logits = reference(ids).logits[0, len(item.context) - 1 : -1].float()
            targets = torch.tensor(item.targets)
            nll = -torch.log_softmax(logits, -1).gather(1, targets[:, None]).sum().item()
            if item.reference:
                ref_nll, ref_tokens = ref_nll + nll, ref_tokens + len(item.targets)
                exact += bool((logits.argmax(-1) == targets).all())
            else:
                text_nll, text_tokens = text_nll + nll, text_tokens + len(item.targets)
    assert ours.perplexity == pytest.approx(math.exp(text_nll / text_tokens), rel=1e-4)
    assert ours.reference_nll == pytest.approx(ref_nll / ref_tokens, rel=1e-4)
    assert ours.exact_match == exact / 2


@pytest.mark.gpu
def test_scores_on_cuda_in_slices_match_the_cpu_scores(setup) -> None:
    """On a GPU the cursor runs the work on its own stream; the numbers are the CPU's (fp32, within rounding)."""
    path, cpu_model, items = setup
    on_cpu = score_items(cpu_model, torch.device("cpu"), items)
    device = torch.device("cuda")
    model = load_model(path, device=device)
    cursor = StepCursor(
        lambda: score_items(model, device, items), yield_at_modules=list(model.layers), device=device
    )
    while not cursor.advance(1e-6):
        pass
    on_gpu = cursor.result()
    assert on_gpu.perplexity == pytest.approx(on_cpu.perplexity, rel=1e-3)
    assert on_gpu.reference_nll == pytest.approx(on_cpu.reference_nll, rel=1e-3)
    assert on_gpu.text_tokens == on_cpu.text_tokens
