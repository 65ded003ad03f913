from pathlib import Path

import pytest
import torch
from alchemist_worker.versions.artifacts import (
    LoraSpec,
    read_full_weights,
    read_lora_adapter,
    read_trainer_state,
    write_full_weights,
    write_lora_adapter,
    write_trainer_state,
)


def test_lora_adapter_loads_with_peft(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base_dir = tiny_checkpoints["llama"]
    torch.manual_seed(0)
    reference = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)  # B starts at zero; make the adapter do something
    tensors = peft.get_peft_model_state_dict(reference)
    spec = LoraSpec(r=4, alpha=8, target_modules=("q_proj", "v_proj"), base_model=str(base_dir))
    write_lora_adapter(tmp_path, {n.removeprefix("base_model.model."): t for n, t in tensors.items()}, spec)

    loaded = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), tmp_path
    )
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-6)
    assert not torch.allclose(expected, plain, atol=1e-4)  # the adapter matters

    read_spec, read_tensors = read_lora_adapter(tmp_path)
    assert read_spec.r == 4 and set(read_spec.target_modules) == {"q_proj", "v_proj"}
    assert set(read_tensors) == {n.removeprefix("base_model.model.") for n in tensors}


def test_lora_writer_rejects_non_lora_tensors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a LoRA tensor"):
        write_lora_adapter(
            tmp_path, {"model.embed_tokens.weight": torch.zeros(2)}, LoraSpec(4, 8, ("q_proj",))
        )


def test_full_weights_load_with_transformers(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base_dir = tiny_checkpoints["qwen2"]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    state = {n: t + 0.01 for n, t in model.state_dict().items() if n != "lm_head.weight"}  # tied: saved once
    write_full_weights(tmp_path, state, base_dir / "config.json")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(reloaded.state_dict()["model.norm.weight"], state["model.norm.weight"])
    assert set(read_full_weights(tmp_path)) == set(state)


def test_trainer_state_roundtrip(tmp_path: Path) -> None:
    assert read_trainer_state(tmp_path) is None
    write_trainer_state(tmp_path, {"step": 3, "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}}})
    state = read_trainer_state(tmp_path)
    assert state is not None and state["step"] == 3
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], torch.ones(2))
