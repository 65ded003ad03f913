"""Checkpoint loading: sharded files, and clear errors for what cannot be loaded."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from alchemist_worker.model import CheckpointError, ConfigError, ModelConfig, load_model
from alchemist_worker.model.checkpoint import hf_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_the_same_weights(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_checkpoints["mistral"]
    hf = AutoModelForCausalLM.from_pretrained(src)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    sharded, single = load_model(tmp_path / "sharded"), load_model(src)
    for (name, a), (_, b) in zip(sharded.state_dict().items(), single.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_tied_embeddings_share_one_tensor(tiny_checkpoints: dict[str, Path]) -> None:
    model = load_model(tiny_checkpoints["qwen2"])
    assert model.lm_head.weight is model.embed_tokens.weight
    assert "lm_head.weight" not in hf_state_dict(model)
    untied = load_model(tiny_checkpoints["llama"])
    assert untied.lm_head.weight is not untied.embed_tokens.weight


def test_hf_state_dict_round_trips(tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints["qwen3"]
    stored = load_file(str(path / "model.safetensors"))
    ours = hf_state_dict(load_model(path))
    assert set(ours) == set(stored)
    assert all(torch.equal(ours[k], stored[k]) for k in stored)


def test_config_reads_each_architecture(tiny_checkpoints: dict[str, Path]) -> None:
    configs = {arch: ModelConfig.from_pretrained(p) for arch, p in tiny_checkpoints.items()}
    assert configs["qwen2"].qkv_bias and not configs["qwen2"].o_bias
    assert configs["qwen3"].qk_norm and configs["qwen3"].num_kv_heads == 1
    assert configs["llama"].rope_scaling is not None and configs["llama"].rope_scaling.factor == 8.0
    assert configs["mistral"].rope_scaling is None and not configs["mistral"].tie_word_embeddings


def test_legacy_rope_fields_are_read() -> None:
    base = json.loads(
        '{"model_type": "llama", "vocab_size": 10, "hidden_size": 64, "intermediate_size": 128,'
        ' "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 500000.0,'
        ' "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,'
        ' "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}'
    )
    config = ModelConfig.from_hf(base)
    assert config.rope_theta == 500000.0 and config.rope_scaling is not None and config.head_dim == 32


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"model_type": "gpt2"}, "unsupported architecture model_type='gpt2'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"num_hidden_layers": "two"}, "'num_hidden_layers' must be an integer"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 4.0}}, "lacks 'low_freq_factor'"),
    ],
)
def test_bad_configs_are_named(
    tiny_checkpoints: dict[str, Path], tmp_path: Path, edit: dict, message: str
) -> None:
    path = copy_checkpoint(tiny_checkpoints["llama"], tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config.update(edit)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_model(path)


def test_missing_and_misshapen_tensors_are_named(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    path = copy_checkpoint(tiny_checkpoints["llama"], tmp_path / "ckpt")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 3)
    tensors["model.layers.0.extra.weight"] = torch.zeros(1)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    text = str(err.value)
    assert "missing tensors ['model.layers.1.mlp.up_proj.weight']" in text
    assert "unexpected tensors ['model.layers.0.extra.weight']" in text
    assert "model.layers.0.self_attn.k_proj.weight: checkpoint (3, 3), config expects (64, 128)" in text


def test_missing_files_are_named(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config\.json does not exist"):
        load_model(tmp_path)
    path = copy_checkpoint(tiny_checkpoints["llama"], tmp_path / "ckpt")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"neither model\.safetensors nor"):
        load_model(path)
    (path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-00001.safetensors"}}')
    with pytest.raises(CheckpointError, match="shard files that do not exist"):
        load_model(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(path)
