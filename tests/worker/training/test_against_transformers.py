"""The reuse path against HF transformers + peft computing the same loss on a right-padded batch."""

from pathlib import Path

import pytest
import torch
from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.model.checkpoint import to_hf_name
from alchemist_worker.training.lora import lora_state_dict
from alchemist_worker.training.step import StepConfig, accumulate_gradients
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from transformers import AutoModelForCausalLM

from tests.worker.training.conftest import (
    ALL_TARGETS,
    big_store,
    make_samples,
    record_prompts,
    relative_error,
    trainable_model,
    zero_grads,
)


def hf_padded_loss(hf, samples, pad_id: int) -> torch.Tensor:
    """Mean response-token loss over a right-padded batch: prompt and padding labelled -100."""
    width = max(s.prompt_len + s.response_len for s in samples)
    ids = torch.full((len(samples), width), pad_id)
    labels = torch.full((len(samples), width), -100)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for i, s in enumerate(samples):
        seq = torch.cat([s.prompt_ids, s.response_ids])
        ids[i, : seq.numel()] = seq
        labels[i, s.prompt_len : seq.numel()] = s.response_ids
        mask[i, : seq.numel()] = 1
    return hf(input_ids=ids, attention_mask=mask, labels=labels).loss


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_reuse_gradient_matches_transformers_and_peft(tiny_checkpoint: Path, mode: str) -> None:
    model, params = trainable_model(tiny_checkpoint, mode)
    samples = make_samples(model.config.vocab_size)
    store = big_store()
    for s, r in zip(samples, record_prompts(model, samples, RecordingPolicy.SELECTIVE), strict=True):
        store.put(s.record_id, r)
    zero_grads(params)
    report = accumulate_gradients(model, store, samples, version=0, config=StepConfig())
    assert report.reused == len(samples)

    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    if mode == "lora":
        hf = get_peft_model(
            hf, LoraConfig(r=4, lora_alpha=8, target_modules=list(ALL_TARGETS), lora_dropout=0.0)
        )
        set_peft_model_state_dict(hf, lora_state_dict(model))
        hf_params = dict(hf.named_parameters())
        ours = {k: p for k, p in zip(lora_state_dict(model), params, strict=True)}
        pairs = [
            (
                ours[key],
                hf_params[
                    key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
                ],
            )
            for key in ours
        ]
    else:
        hf_params = dict(hf.named_parameters())
        pairs = [(p, hf_params[to_hf_name(name)]) for name, p in model.named_parameters()]
    loss = hf_padded_loss(hf, samples, pad_id=model.config.pad_token_id or 0)
    loss.backward()
    assert report.loss == pytest.approx(loss.item(), rel=1e-5)
    ours_grads = [a.grad for a, _ in pairs]
    ref_grads = [b.grad for _, b in pairs]
    assert all(g is not None for g in ours_grads + ref_grads)
    assert relative_error(ours_grads, ref_grads) <= 1e-5
