import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_checkpoints_cover_the_architectures(tiny_checkpoints: dict[str, Path]) -> None:
    configs = {
        arch: json.loads((path / "config.json").read_text()) for arch, path in tiny_checkpoints.items()
    }
    assert {c["model_type"] for c in configs.values()} == {"llama", "qwen2", "qwen3", "mistral"}
    for config in configs.values():
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        assert head_dim >= 32
    assert any(c["num_key_value_heads"] < c["num_attention_heads"] for c in configs.values())
    assert {c["tie_word_embeddings"] for c in configs.values()} == {True, False}


def test_tiny_checkpoint_loads_and_chats(tiny_checkpoint: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == text
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.1  # weights scaled up from the default init, so logits differ meaningfully
