"""Logits of the native model against HF transformers on the same checkpoints."""

from pathlib import Path

import pytest
import torch
from alchemist_worker.bundled_model import ensure_small_model
from alchemist_worker.model import DenseCausalAttention, load_model
from transformers import AutoModelForCausalLM

from tests.fixtures.checkpoints import build_checkpoint

LENGTHS = [5, 80, 1, 23]  # 80 > the llama fixture's original_max_position_embeddings (64)


def flat_batch(vocab: int, lengths: list[int], seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]
    return seqs, torch.cat([torch.arange(n) for n in lengths])


def native_logits(model, seqs: list[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    offsets = [0]
    for s in seqs:
        offsets.append(offsets[-1] + len(s))
    with torch.no_grad():
        hidden = model(torch.cat(seqs), positions, DenseCausalAttention(offsets))
        return model.compute_logits(hidden)


def hf_logits(hf, seqs: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([hf(s[None]).logits[0] for s in seqs])


def test_logits_match_transformers(tiny_checkpoint: Path) -> None:
    model = load_model(tiny_checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    seqs, positions = flat_batch(model.config.vocab_size, LENGTHS)
    ours, ref = native_logits(model, seqs, positions), hf_logits(hf, seqs)
    assert ref.std() > 0.1
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_logits_match_transformers_on_smollm2() -> None:
    path = ensure_small_model()
    model = load_model(path)
    assert model.config.num_layers == 30 and model.config.tie_word_embeddings
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seqs, positions = flat_batch(model.config.vocab_size, [37, 12])
    ours, ref = native_logits(model, seqs, positions), hf_logits(hf, seqs)
    # Relative to the logits' scale (|logit| up to ~15 over 30 fp32 layers): CPUs with different vector units
    # sum the GEMMs in different orders, 1.2e-4 apart at most measured; a real divergence is orders larger.
    assert (ours - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_sliding_window_matches_transformers(tmp_path: Path) -> None:
    path = build_checkpoint(tmp_path / "mistral-window", "mistral", sliding_window=8)
    model = load_model(path)
    assert model.config.sliding_window == 8
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seqs, positions = flat_batch(model.config.vocab_size, [30, 6])
    offsets = [0, 30, 36]
    with torch.no_grad():
        hidden = model(torch.cat(seqs), positions, DenseCausalAttention(offsets, sliding_window=8))
        ours = model.compute_logits(hidden)
        no_window = model.compute_logits(model(torch.cat(seqs), positions, DenseCausalAttention(offsets)))
    ref = hf_logits(hf, seqs)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert (no_window - ref).abs().max().item() > 1e-2  # the window changes the result, so it was tested


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loads_and_tracks_fp32(tiny_checkpoints: dict[str, Path], dtype: torch.dtype) -> None:
    path = tiny_checkpoints["qwen3"]
    half, full = load_model(path, dtype=dtype), load_model(path)
    assert all(p.dtype == dtype for p in half.parameters())
    seqs, positions = flat_batch(full.config.vocab_size, [9, 14])
    low, ref = native_logits(half, seqs, positions), native_logits(full, seqs, positions)
    assert low.dtype == dtype and torch.isfinite(low).all()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    # Same precision, same operation order: close to HF in the low precision too.
    assert (low.float() - hf_logits(hf, seqs).float()).abs().max().item() <= 0.1
    assert (low.float() - ref).abs().max().item() <= 0.25


def test_decode_step_matches_full_prefill(tiny_checkpoints: dict[str, Path]) -> None:
    """Through the backend contract: a one-token step attending to cached K/V equals the full forward."""
    from alchemist_worker.model.attention import varlen_attention

    model = load_model(tiny_checkpoints["llama"])
    ids = torch.randint(0, model.config.vocab_size, (12,))

    class CachingBackend:
        def __init__(self) -> None:
            self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def attend(self, layer, q, k, v, *, need_lse=False):
            if layer in self.cache:
                k = torch.cat([self.cache[layer][0], k])
                v = torch.cat([self.cache[layer][1], v])
            self.cache[layer] = (k, v)
            return varlen_attention(q, k, v, [0, q.shape[0]], [0, k.shape[0]], need_lse=need_lse)

    backend = CachingBackend()
    with torch.no_grad():
        model(ids[:11], torch.arange(11), backend)
        step = model.compute_logits(model(ids[11:], torch.tensor([11]), backend))
        full = model.compute_logits(model(ids, torch.arange(12), DenseCausalAttention([0, 12])))
    assert (step[0] - full[-1]).abs().max().item() <= 1e-5
