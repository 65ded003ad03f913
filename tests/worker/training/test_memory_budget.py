"""The byte accounting of training at scale agrees with published model sizes and with what the recorder and
the LoRA code allocate on small models."""

from pathlib import Path

import pytest
from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.activations.store import ActivationStore, StoreConfig
from alchemist_worker.model import load_model
from alchemist_worker.model.config import ModelConfig
from alchemist_worker.training.lora import LoRAConfig, add_lora
from alchemist_worker.training.memory_budget import (
    GiB,
    kv_cache_bytes_per_token,
    lora_parameter_count,
    parameter_count,
    plan_gpu,
    record_bytes_per_token,
)

from tests.worker.training.conftest import ALL_TARGETS, make_samples, record_prompts

LLAMA3_8B = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
)  # fmt: skip
LLAMA3_70B = dict(
    LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64
)


def test_parameter_counts_match_the_published_sizes() -> None:
    """Meta's model cards: Llama 3 8B has 8,030,261,248 parameters, Llama 3 70B 70,553,706,496."""
    assert parameter_count(ModelConfig.from_hf(LLAMA3_8B)) == 8_030_261_248
    assert parameter_count(ModelConfig.from_hf(LLAMA3_70B)) == 70_553_706_496


def test_counts_match_the_models_tensors(tiny_checkpoint: Path) -> None:
    model = load_model(tiny_checkpoint)
    assert parameter_count(model.config) == sum(p.numel() for p in model.parameters())
    params = add_lora(model, LoRAConfig(rank=4, alpha=8.0, target_modules=ALL_TARGETS))
    assert lora_parameter_count(model.config, 4) == sum(p.numel() for p in params)


@pytest.mark.parametrize("policy", list(RecordingPolicy))
def test_record_bytes_match_the_recorder(tiny_checkpoint: Path, policy: RecordingPolicy) -> None:
    model = load_model(tiny_checkpoint)
    samples = make_samples(model.config.vocab_size)
    records = record_prompts(model, samples, policy)
    store = ActivationStore(StoreConfig(device_budget_bytes=0, host_budget_bytes=1 << 40))
    for i, record in enumerate(
        records
    ):  # prompts of one step may share its buffers: the store counts them once
        store.put(str(i), record)
    measured = store.host_bytes / sum(s.prompt_len for s in samples)
    assert record_bytes_per_token(model.config, policy, dtype_bytes=4) == measured


def test_tensor_parallel_shares_and_plan() -> None:
    c = ModelConfig.from_hf(LLAMA3_70B)
    # x and o stay whole on every rank; the rest shards (KV heads over at most 8 ranks)
    whole = 2 * c.hidden_size * 2 * c.num_layers
    full1 = record_bytes_per_token(c, RecordingPolicy.FULL, dtype_bytes=2)
    full8 = record_bytes_per_token(c, RecordingPolicy.FULL, dtype_bytes=2, tp=8)
    assert full8 - whole == pytest.approx((full1 - whole) / 8, rel=1e-9)
    assert kv_cache_bytes_per_token(c, dtype_bytes=2, tp=16) == kv_cache_bytes_per_token(
        c, dtype_bytes=2, tp=8
    )
    plan = plan_gpu(c, gpu_bytes=80 * GiB, serving_kv_tokens=0, lora_rank=16)
    assert plan.left < 0  # 70B in bf16 alone is larger than one 80 GB GPU
    assert plan.prompt_tokens_of_records(full1) == 0
