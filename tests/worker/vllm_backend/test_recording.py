"""Records made inside vLLM's prefill equal the native engine's, under chunked prefill and mixed batches
(all but the softmax log-sum-exp, which vLLM's records leave to the trainer).

Each engine runs with a 32-token step budget, so the 75-token prompt arrives in three chunks, in steps that also
decode the short request started before it; a third request is not recorded and shares those steps too. The
`compiled` cases run vLLM's compiled model (recording happens inside it, through the record op); the others
run eagerly (quicker to start; the same op, called directly).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.engine.serving_engine import GenerationRequest
from alchemist_worker.model import load_model

from tests.worker.vllm_backend.conftest import native_record, prompt_of, request, run_all, vllm_engine

CASES = [(arch, policy, False) for arch in ("llama", "qwen3") for policy in RecordingPolicy] + [
    ("qwen2", RecordingPolicy.FULL, False),
    ("mistral", RecordingPolicy.SELECTIVE, False),
    # compiled: `full` hands over every field (k before QK norm too, for qwen3); kv the fewest
    ("llama", RecordingPolicy.FULL, True),
    ("qwen3", RecordingPolicy.FULL, True),
    ("llama", RecordingPolicy.KV, True),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "policy", "compiled"),
    CASES,
    ids=[f"{a}-{p.value}{'-compiled' if c else ''}" for a, p, c in CASES],
)
def test_records_equal_the_native_engines(
    tiny_checkpoints: dict[str, Path], arch: str, policy: RecordingPolicy, compiled: bool
) -> None:
    path = tiny_checkpoints[arch]
    engine = vllm_engine(path, policy.value, compile=compiled, max_num_batched_tokens=32, max_num_seqs=4)
    vocab = engine.model_config.vocab_size
    short, long, other = prompt_of(10, vocab, 1), prompt_of(75, vocab, 2), prompt_of(20, vocab, 3)
    steps = []
    plan = engine._plan_step

    def spy(scheduler_output):  # the layout of every recording step, to prove chunks and mixing happened
        step = plan(scheduler_output)
        if step is not None:
            steps.append(step)
        return step

    engine._plan_step = spy
    engine.add_request(request("short", short, max_tokens=12))
    engine.step()  # short is prefilled and decoding when the long prompt arrives
    engine.add_request(request("long", long, max_tokens=3))
    plain = request("other", other, max_tokens=3)
    engine.add_request(
        GenerationRequest(plain.request_id, plain.prompt_token_ids, plain.params, record=False)
    )
    outputs = run_all(engine)
    assert all(outputs[r][-1].finished for r in ("short", "long", "other"))

    long_steps = [s for s in steps if any(seg.prompt.response_id == "long" for seg in s._segments)]
    assert len(long_steps) >= 3, "the long prompt was not prefilled in chunks"
    assert any(len(s._segments) < len(s.layout.req_ids) for s in long_steps), "no step mixed in other rows"

    native = load_model(path)
    store = engine.recording.store
    assert "other" not in store
    for rid, prompt in (("short", short), ("long", long)):
        ours, ref = store.get(rid), native_record(native, prompt, policy)
        assert ours is not None, f"{rid} was not recorded"
        assert ours.token_ids.tolist() == prompt and ours.start_position == 0 and ours.version == 0
        assert ours.policy is policy and ours.num_layers == ref.num_layers
        assert (
            ours.lse_deferred is policy.wants_lse
        )  # vLLM's attention does not return it: the trainer computes it
        for layer, (a, b) in enumerate(zip(ours.layers, ref.layers, strict=True)):
            assert set(a) == set(b) - {"lse"}
            for name in a:
                torch.testing.assert_close(
                    a[name], b[name], rtol=1e-4, atol=1e-4, msg=f"{rid} layer {layer} {name}"
                )


def test_only_a_recording_engine_has_the_record_op_in_its_layers(tiny_checkpoints: dict[str, Path]) -> None:
    """An engine that never records runs vLLM's forward with no record op (nothing to pay in any step)."""
    path = tiny_checkpoints["llama"]
    for policy, has_op in (("off", False), ("kv", True)):
        layers = vllm_engine(path, policy).served_model.model.layers
        assert all((layer.record_token is not None) is has_op for layer in layers), policy
