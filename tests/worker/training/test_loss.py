"""The chunked response loss gives the loss and gradients of an unchunked cross-entropy, ours and HF's."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.activations.transfer import LayerStreamer
from alchemist_worker.model.checkpoint import to_hf_name
from alchemist_worker.training import loss as loss_module
from alchemist_worker.training.lora import lora_state_dict
from alchemist_worker.training.loss import chunked_cross_entropy_sum
from alchemist_worker.training.reuse import reuse_backward
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from transformers import AutoModelForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from tests.worker.training.conftest import (
    ALL_TARGETS,
    big_store,
    make_samples,
    record_prompts,
    relative_error,
    trainable_model,
    zero_grads,
)
from tests.worker.training.test_against_transformers import hf_padded_loss

ROWS, HIDDEN, VOCAB = 11, 24, 37


def inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(ROWS, HIDDEN, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (ROWS,), generator=gen)
    return hidden, weight, labels


def loss_and_grads(fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden, weight, labels = inputs()
    loss = fn(hidden, weight, labels)
    (loss * 0.37).backward()  # an upstream gradient other than one reaches the saved gradients
    assert hidden.grad is not None and weight.grad is not None
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("rows", [1, 4, ROWS, 100])
def test_chunked_loss_equals_the_unchunked_cross_entropy(rows: int) -> None:
    ours = loss_and_grads(lambda h, w, y: chunked_cross_entropy_sum(h, w, y, rows=rows))
    ref = loss_and_grads(lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y, reduction="sum"))
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_loss_equals_transformers_causal_lm_loss() -> None:
    """HF's loss takes logits of every position and shifts the labels itself; its mean times the row count is
    our sum over the same rows."""

    def hf(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, w)[None]  # [1, R, vocab]: the positions that predict y
        shifted = torch.cat([torch.tensor([-100]), y])[None]  # HF predicts labels[t + 1] from position t
        padded = torch.cat([logits, logits.new_zeros(1, 1, VOCAB)], dim=1)
        return ForCausalLMLoss(padded, shifted, VOCAB) * ROWS

    ours = loss_and_grads(lambda h, w, y: chunked_cross_entropy_sum(h, w, y, rows=3))
    ref = loss_and_grads(hf)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_frozen_head_gets_no_gradient_and_half_precision_tracks_fp32() -> None:
    hidden, weight, labels = inputs(torch.bfloat16)
    weight.requires_grad_(False)
    loss = chunked_cross_entropy_sum(hidden, weight, labels, rows=4)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None and hidden.grad.dtype == torch.bfloat16
    ref_h = hidden.detach().float().requires_grad_()
    ref = F.cross_entropy(F.linear(ref_h, weight.float()), labels, reduction="sum")
    ref.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref.detach(), rtol=2e-2, atol=0.0)
    torch.testing.assert_close(hidden.grad.float(), ref_h.grad, rtol=5e-2, atol=5e-3)


def test_chunk_rows_keep_one_chunk_of_logits_small() -> None:
    assert loss_module.chunk_rows(49152) * 49152 <= loss_module.LOGIT_ELEMENTS
    assert loss_module.chunk_rows(10 * loss_module.LOGIT_ELEMENTS) == 1


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_reuse_with_small_loss_chunks_matches_transformers(
    tiny_checkpoints: dict[str, Path], mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole reuse path with the loss cut into chunks of two rows: loss and gradient are HF's (Qwen2 ties
    the output projection to the embeddings, so full fine-tuning trains the head through both)."""
    tiny_checkpoint = tiny_checkpoints["qwen2"]
    model, params = trainable_model(tiny_checkpoint, mode)
    monkeypatch.setattr(loss_module, "LOGIT_ELEMENTS", 2 * model.config.vocab_size)
    samples = make_samples(model.config.vocab_size)
    store = big_store()
    for s, r in zip(samples, record_prompts(model, samples, RecordingPolicy.FULL), strict=True):
        store.put(s.record_id, r)
    total = sum(s.response_len for s in samples)
    zero_grads(params)
    streamer = LayerStreamer(store, [s.record_id for s in samples], offload=True)
    loss_sum = reuse_backward(model, samples, streamer, scale=1 / total)

    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    if mode == "lora":
        hf = get_peft_model(
            hf, LoraConfig(r=4, lora_alpha=8, target_modules=list(ALL_TARGETS), lora_dropout=0.0)
        )
        set_peft_model_state_dict(hf, lora_state_dict(model))
        hf_params = dict(hf.named_parameters())
        names = [
            k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
            for k in lora_state_dict(model)
        ]
        pairs = [(p, hf_params[name]) for p, name in zip(params, names, strict=True)]
    else:
        hf_params = dict(hf.named_parameters())
        pairs = [(p, hf_params[to_hf_name(name)]) for name, p in model.named_parameters()]
    ref = hf_padded_loss(hf, samples, pad_id=model.config.pad_token_id or 0)
    ref.backward()
    assert loss_sum / total == pytest.approx(ref.item(), rel=1e-5)
    assert relative_error([a.grad for a, _ in pairs], [b.grad for _, b in pairs]) <= 1e-5
