"""LoRA adapters in PEFT's layout: files PEFT loads, files PEFT wrote, and full fine-tuning."""

from pathlib import Path

import pytest
import torch
from alchemist_worker.model import DenseCausalAttention, load_model
from alchemist_worker.training.lora import (
    LoRAConfig,
    add_lora,
    enable_full_finetuning,
    load_adapter,
    load_lora_state_dict,
    lora_state_dict,
    save_adapter,
)
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.compute_logits(
            model(ids, torch.arange(ids.numel()), DenseCausalAttention([0, ids.numel()]))
        )


def test_saved_adapter_loads_in_peft_with_the_same_logits(
    tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    path = tiny_checkpoints["qwen3"]
    model = load_model(path)
    config = LoRAConfig(rank=4, alpha=16.0, target_modules=("q_proj", "v_proj", "down_proj"))
    params = add_lora(model, config)
    assert all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in model.parameters()) == len(params) == 2 * 3 * model.config.num_layers
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, 0.1)
    save_adapter(model, config, tmp_path / "adapter", base_model=str(path))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "adapter")
    ids = torch.randint(0, model.config.vocab_size, (13,))
    with torch.no_grad():
        ref = peft_model(ids[None]).logits[0]
        base = AutoModelForCausalLM.from_pretrained(path)(ids[None]).logits[0]
    assert (logits(model, ids) - ref).abs().max() <= 1e-4
    assert (ref - base).abs().max() > 1e-2  # the adapter changed the output, so it was loaded


def test_adapter_saved_by_peft_loads_here(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    path = tiny_checkpoints["llama"]
    hf = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path),
        LoraConfig(r=8, lora_alpha=8, target_modules=["k_proj", "o_proj", "up_proj"], lora_dropout=0.0),
    )
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.1)
    hf.save_pretrained(tmp_path / "peft")
    model = load_model(path)
    config = load_adapter(model, tmp_path / "peft")
    assert config.rank == 8 and config.target_modules == ("k_proj", "o_proj", "up_proj")
    ids = torch.randint(0, model.config.vocab_size, (9,))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    assert (logits(model, ids) - ref).abs().max() <= 1e-4


def test_state_dict_round_trip_and_mismatches(tiny_checkpoints: dict[str, Path]) -> None:
    model = load_model(tiny_checkpoints["mistral"])
    add_lora(model, LoRAConfig(rank=2, alpha=4.0))
    state = {k: torch.randn_like(v) for k, v in lora_state_dict(model).items()}
    assert next(iter(state)) == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    load_lora_state_dict(model, state)
    assert all(torch.equal(state[k], v) for k, v in lora_state_dict(model).items())
    with pytest.raises(ValueError, match="missing"):
        load_lora_state_dict(model, dict(list(state.items())[1:]))
    with pytest.raises(ValueError, match="not among"):
        LoRAConfig(target_modules=("lm_head",))


def test_full_finetuning_trains_every_weight_and_drops_adapters(tiny_checkpoints: dict[str, Path]) -> None:
    model = load_model(tiny_checkpoints["qwen2"])
    add_lora(model, LoRAConfig(rank=2, alpha=4.0))
    params = enable_full_finetuning(model)
    assert lora_state_dict(model) == {}
    assert len(params) == len(list(model.parameters())) and all(p.requires_grad for p in params)
