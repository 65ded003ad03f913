"""Training on what vLLM serves: one copy of the base weights, gradients from vLLM's records, version switches.

The trainer's model is a native `Transformer` over views of vLLM's tensors; its gradient from records made in
vLLM's prefill must equal the recompute gradient, and a version published into vLLM must serve exactly what the
native engine serves with the same weights (greedy tokens), never reading prefix-cache entries of the old one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.activations.transfer import LayerStreamer
from alchemist_worker.engine.serving_engine import WeightSwitch
from alchemist_worker.training.batch import TrainingSample
from alchemist_worker.training.lora import LoRAConfig, add_lora, lora_modules
from alchemist_worker.training.recompute import recompute_backward
from alchemist_worker.training.reuse import reuse_backward
from alchemist_worker.vllm_backend.weight_views import shared_storage

from tests.worker.engine.conftest import build_engine, run_to_completion, tokens_of
from tests.worker.training.conftest import grads, relative_error, zero_grads
from tests.worker.vllm_backend.conftest import ALL_TARGETS, prompt_of, request, run_all, tokens, vllm_engine

pytestmark = pytest.mark.slow
LORA = LoRAConfig(rank=4, alpha=8.0, target_modules=ALL_TARGETS)


def test_the_trainer_computes_on_vllms_own_tensors(tiny_checkpoints: dict[str, Path]) -> None:
    for arch in ("llama", "qwen3"):  # untied and tied embeddings
        engine = vllm_engine(tiny_checkpoints[arch])
        model, served = engine.training_model, engine.served_model
        inside, total = shared_storage(model, served)
        assert inside == total > 0  # every base weight is a view: no second copy exists
        padded = served.model.embed_tokens.weight
        assert padded.shape[0] >= model.config.vocab_size  # vLLM pads the vocabulary; the view is sliced
        assert model.embed_tokens.weight.shape[0] == model.config.vocab_size
        with torch.no_grad():  # a write through vLLM's tensor is seen by the trainer's view
            served.model.layers[0].self_attn.qkv_proj.weight[0, 0] += 1.0
        assert (
            model.layers[0].self_attn.q_proj.weight[0, 0]
            == served.model.layers[0].self_attn.qkv_proj.weight[0, 0]
        )


@pytest.mark.parametrize("policy", [RecordingPolicy.KV, RecordingPolicy.FULL])
def test_gradient_from_vllm_records_equals_recompute(
    tiny_checkpoints: dict[str, Path], policy: RecordingPolicy
) -> None:
    engine = vllm_engine(
        tiny_checkpoints["llama"],
        policy.value,
        max_num_batched_tokens=16,
        max_num_seqs=4,
        adapter={"rank": 4, "target_modules": list(ALL_TARGETS)},
    )
    vocab = engine.model_config.vocab_size
    model = engine.training_model
    _random_lora(model, seed=0)  # served as version 1: the records hold the adapter's activations
    params = [p for p in model.parameters() if p.requires_grad]
    engine.request_weight_switch(WeightSwitch(version=1, apply=lambda: None))
    gen = torch.Generator().manual_seed(5)
    samples = []
    for i, length in enumerate((9, 30, 1)):  # the 30-token prompt is recorded in two chunks
        prompt = prompt_of(length, vocab, 10 + i)
        engine.add_request(request(f"r{i}", prompt, max_tokens=2))
        samples.append(
            TrainingSample(
                f"s{i}", torch.tensor(prompt), torch.randint(0, vocab, (4,), generator=gen), record_id=f"r{i}"
            )
        )
    run_all(engine)
    total = sum(s.response_len for s in samples)
    zero_grads(params)
    ref_loss = recompute_backward(model, samples, scale=1 / total)
    ref = grads(params)
    zero_grads(params)
    streamer = LayerStreamer(engine.recording.store, [s.record_id for s in samples], offload=True)
    loss = reuse_backward(model, samples, streamer, scale=1 / total)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    assert all(r.abs().sum() > 0 for r in ref)
    assert relative_error(grads(params), ref) <= 1e-4


def _random_lora(model: torch.nn.Module, seed: int, lora: LoRAConfig = LORA) -> dict[str, torch.Tensor]:
    add_lora(model, lora)
    gen = torch.Generator().manual_seed(seed)
    values = {}
    with torch.no_grad():
        for name, module in lora_modules(model):
            for which in ("lora_A", "lora_B"):
                param = getattr(module, which)
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
                values[f"{name}.{which}"] = param.detach().clone()
    return values


def native_with_lora(path: Path, lora: LoRAConfig, values: dict[str, torch.Tensor]) -> Any:
    """The native engine serving the adapter `values` (as `_random_lora` made them)."""
    native = build_engine(path)
    add_lora(native.training_model, lora)
    with torch.no_grad():
        for name, module in lora_modules(native.training_model):
            module.lora_A.copy_(values[f"{name}.lora_A"])
            module.lora_B.copy_(values[f"{name}.lora_B"])
    return native


@pytest.mark.parametrize(
    ("compile", "rank"),
    # two compiled adapter shapes one after the other: neither may load the other's compiled graph
    [(False, 4), (True, 4), (True, 2)],
    ids=["eager", "compiled", "compiled-rank-2"],
)
def test_a_published_version_serves_what_the_native_engine_serves(
    tiny_checkpoints: dict[str, Path], compile: bool, rank: int
) -> None:
    path = tiny_checkpoints["llama"]
    engine = vllm_engine(
        path, "full", compile=compile, adapter={"rank": rank, "target_modules": list(ALL_TARGETS)}
    )
    vocab = engine.model_config.vocab_size
    prompts = [prompt_of(40, vocab, 21), prompt_of(7, vocab, 22)]

    def generate(tag: str) -> list[list[int]]:
        for i, prompt in enumerate(prompts):
            engine.add_request(request(f"{tag}{i}", prompt, max_tokens=8))
        outputs = run_all(engine)
        return [tokens(outputs[f"{tag}{i}"]) for i in range(len(prompts))]

    lora = LoRAConfig(rank=rank, alpha=8.0, target_modules=ALL_TARGETS)
    base = generate("a")
    native_requests = [request(f"n{i}", prompt, max_tokens=8) for i, prompt in enumerate(prompts)]
    native_out = run_to_completion(build_engine(path), native_requests)
    assert base == [tokens_of(native_out[f"n{i}"]) for i in range(len(prompts))]

    values = _random_lora(engine.training_model, seed=3, lora=lora)
    engine.request_weight_switch(WeightSwitch(version=1, apply=lambda: None))
    engine.add_request(request("held", prompts[0], max_tokens=8))  # waits for the switch, then runs on v1
    outputs = run_all(engine)
    assert engine.weight_version == 1 and outputs["held"][-1].weight_version == 1
    switched = [tokens(outputs["held"]), *generate("b")[1:]]

    native = native_with_lora(path, lora, values)
    expected = [tokens_of(out) for out in run_to_completion(native, native_requests).values()]
    assert switched == expected
    assert switched != base  # the adapter changes the answers, so the comparison above can fail
    # a record made after the switch belongs to version 1 and was made with the adapter
    assert engine.recording.store.get("held").version == 1


def test_full_fine_tuning_versions_are_written_into_the_served_tensors(
    tiny_checkpoints: dict[str, Path],
) -> None:
    path = tiny_checkpoints["qwen3"]
    engine = vllm_engine(path)
    served_qkv = engine.served_model.model.layers[1].self_attn.qkv_proj.weight
    address = served_qkv.data_ptr()
    new_weight = torch.nn.Parameter(engine.training_model.layers[1].self_attn.k_proj.weight.detach() * 1.7)
    engine.training_model.layers[1].self_attn.k_proj.weight = new_weight  # a version installed by the trainer
    engine.request_weight_switch(WeightSwitch(version=2, apply=lambda: None))
    prompt = prompt_of(12, engine.model_config.vocab_size, 31)
    engine.add_request(request("r", prompt, max_tokens=6))
    out = tokens(run_all(engine)["r"])
    assert served_qkv.data_ptr() == address  # written in place: compiled graphs keep their addresses
    q_size = engine.model_config.q_size
    torch.testing.assert_close(served_qkv[q_size : q_size + engine.model_config.kv_size], new_weight.detach())

    native = build_engine(path)
    native.training_model.layers[1].self_attn.k_proj.weight = torch.nn.Parameter(new_weight.detach().clone())
    assert out == tokens_of(run_to_completion(native, [request("r", prompt, max_tokens=6)])["r"])


@pytest.mark.parametrize("salted", [True, False], ids=["salted", "one-salt-for-all"])
def test_prefix_cache_entries_of_the_old_version_are_never_reused(
    tiny_checkpoints: dict[str, Path], salted: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unrecorded requests read the prefix cache; after a switch, blocks cached under v0 must not serve v1.

    Without the per-version salt (second case) the same test sees v0's KV served under v1: it can fail.
    """
    from alchemist_worker.engine.serving_engine import GenerationRequest
    from alchemist_worker.vllm_backend.engine import VllmEngine

    if not salted:
        monkeypatch.setattr(VllmEngine, "cache_salt", staticmethod(lambda version: "one-salt"))
    path = tiny_checkpoints["llama"]
    engine = vllm_engine(path, adapter={"rank": 4, "target_modules": list(ALL_TARGETS)})
    prompt = prompt_of(200, engine.model_config.vocab_size, 50)  # a full 128-token block gets cached

    def generate(rid: str) -> list[int]:
        plain = request(rid, prompt, max_tokens=6)
        engine.add_request(GenerationRequest(rid, plain.prompt_token_ids, plain.params, record=False))
        return tokens(run_all(engine)[rid])

    generate("warm")  # v0's KV of the first block is now cached
    values = _random_lora(engine.training_model, seed=9)
    engine.request_weight_switch(WeightSwitch(version=1, apply=lambda: None))
    after = generate("after")
    native = native_with_lora(path, LORA, values)
    expected = tokens_of(run_to_completion(native, [request("n", prompt, max_tokens=6)])["n"])
    assert (after == expected) is salted
