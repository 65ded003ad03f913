"""Prefill recording: what each policy keeps, per sequence, and that the forward itself is unchanged."""

import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from alchemist_worker.activations import recorder as recorder_module
from alchemist_worker.activations.policy import RecordingPolicy, parse_policy
from alchemist_worker.activations.recorder import CopyThread, PrefillRecorder
from alchemist_worker.activations.records import SequenceRecord, concat_records
from alchemist_worker.activations.store import ActivationStore, StoreConfig
from alchemist_worker.model import DenseCausalAttention, LayerActivations, load_model
from alchemist_worker.model.attention import varlen_attention


class Capture:
    """A recorder that keeps references to everything the layers hand over (to check the records)."""

    wants_lse = True

    def __init__(self) -> None:
        self.layers: dict[int, LayerActivations] = {}

    def record_layer(self, layer: int, activations: LayerActivations) -> None:
        self.layers[layer] = activations


def prefill(model, lengths, recorder=None, keep=None):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (sum(lengths),), generator=gen)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    positions = torch.cat([torch.arange(n) for n in lengths])
    with torch.inference_mode():
        hidden = model(ids, positions, DenseCausalAttention(cu), recorder)
    return ids, cu, positions, hidden


def synthetic_layer(
    x: torch.Tensor, gate_up: torch.Tensor, *, lse: torch.Tensor | None, handed_over: set[str]
) -> LayerActivations:
    """A layer of 2 heads of 4 over x [T, 8], every attention field a view of x, gate/up halves of one fused
    [T, 12] buffer."""
    heads = x.view(x.shape[0], 2, 4)
    return LayerActivations(
        x=x, q_lin=x, k_lin=x, k=heads, v=heads, attn=heads, lse=lse, o=x,
        gate=gate_up[:, :6], up=gate_up[:, 6:], handed_over=frozenset(handed_over),
    )  # fmt: skip


@pytest.mark.parametrize("background", [False, True], ids=["copies-in-step", "copy-thread"])
@pytest.mark.parametrize("policy", list(RecordingPolicy))
def test_records_hold_each_sequences_slice_of_the_policys_fields(
    tiny_checkpoints: dict[str, Path], policy: RecordingPolicy, background: bool
) -> None:
    model = load_model(tiny_checkpoints["qwen3"])
    lengths = [5, 9, 3]
    capture = Capture()
    ids, cu, _, plain = prefill(model, lengths, capture)
    copy_thread = CopyThread() if background else None
    recorder = PrefillRecorder(
        policy, cu, ids, num_layers=2, version=7, qk_norm=True, keep=[True, False, True],
        copy_thread=copy_thread,
    )  # fmt: skip
    _, _, _, recorded = prefill(model, lengths, recorder)
    assert torch.equal(plain, recorded)  # recording does not change the forward
    records = recorder.records()
    assert records[1] is None
    for seq in (0, 2):
        rec = records[seq]
        assert rec is not None and rec.version == 7 and rec.policy is policy
        assert torch.equal(rec.token_ids, ids[cu[seq] : cu[seq + 1]])
        for layer in range(2):
            assert set(rec.layers[layer]) == set(policy.fields(qk_norm=True))
            for name, tensor in rec.layers[layer].items():
                full = getattr(capture.layers[layer], name)
                assert torch.equal(tensor, full[cu[seq] : cu[seq + 1]]), name
                assert not tensor.is_inference()  # autograd may save it later
                assert tensor.is_contiguous()
                assert tensor.untyped_storage().data_ptr() != full.untyped_storage().data_ptr()
    if copy_thread is not None:
        copy_thread.close()


def test_policies_grow_and_kv_skips_the_softmax_statistics() -> None:
    fields = {p: set(p.fields(qk_norm=False)) for p in RecordingPolicy}
    assert fields[RecordingPolicy.KV] < fields[RecordingPolicy.SELECTIVE] < fields[RecordingPolicy.FULL]
    assert (
        "k_lin" in RecordingPolicy.FULL.fields(qk_norm=True) and "k_lin" not in fields[RecordingPolicy.FULL]
    )
    assert not RecordingPolicy.KV.wants_lse and RecordingPolicy.SELECTIVE.wants_lse
    assert parse_policy("full") is RecordingPolicy.FULL
    with pytest.raises(ValueError, match="choose one of: kv, selective, full"):
        parse_policy("everything")


def test_kv_policy_does_not_ask_attention_for_statistics(tiny_checkpoints: dict[str, Path]) -> None:
    model = load_model(tiny_checkpoints["llama"])
    asked = []

    class Spy(DenseCausalAttention):
        def attend(self, layer, q, k, v, *, need_lse=False):
            asked.append(need_lse)
            return super().attend(layer, q, k, v, need_lse=need_lse)

    ids = torch.arange(6)
    for recorder, expected in [
        (None, False),
        (PrefillRecorder(RecordingPolicy.KV, [0, 6], ids, num_layers=2, version=0), False),
        (PrefillRecorder(RecordingPolicy.SELECTIVE, [0, 6], ids, num_layers=2, version=0), True),
    ]:
        asked.clear()
        with torch.no_grad():
            model(ids, torch.arange(6), Spy([0, 6]), recorder)
        assert asked == [expected, expected]


def test_chunked_prefill_records_concatenate_to_the_one_shot_record(
    tiny_checkpoints: dict[str, Path],
) -> None:
    model = load_model(tiny_checkpoints["llama"])
    ids = torch.randint(0, model.config.vocab_size, (11,))
    one = PrefillRecorder(RecordingPolicy.FULL, [0, 11], ids, num_layers=2, version=0)
    with torch.no_grad():
        model(ids, torch.arange(11), DenseCausalAttention([0, 11]), one)
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    class Chunked:
        def attend(self, layer, q, k, v, *, need_lse=False):
            if layer in cache:
                k, v = torch.cat([cache[layer][0], k]), torch.cat([cache[layer][1], v])
            cache[layer] = (k, v)
            return varlen_attention(q, k, v, [0, q.shape[0]], [0, k.shape[0]], need_lse=need_lse)

    chunks: list[SequenceRecord] = []
    for start, end in [(0, 4), (4, 11)]:
        rec = PrefillRecorder(
            RecordingPolicy.FULL,
            [0, end - start],
            ids[start:end],
            num_layers=2,
            version=0,
            start_positions=[start],
        )
        with torch.no_grad():
            model(ids[start:end], torch.arange(start, end), Chunked(), rec)
        chunks.append(rec.records()[0])  # type: ignore[arg-type]
    joined, whole = concat_records(chunks), one.records()[0]
    assert whole is not None and torch.equal(joined.token_ids, whole.token_ids)
    for a, b in zip(joined.layers, whole.layers, strict=True):
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expected 4"):
        concat_records([chunks[0], chunks[0]])


def test_incomplete_recording_is_an_error() -> None:
    recorder = PrefillRecorder(RecordingPolicy.KV, [0, 3], torch.arange(3), num_layers=2, version=0)
    with pytest.raises(RuntimeError, match="never recorded"):
        recorder.records()
    with pytest.raises(ValueError, match="keep has 2 entries for 1 sequences"):
        PrefillRecorder(
            RecordingPolicy.KV, [0, 3], torch.arange(3), num_layers=2, version=0, keep=[True, True]
        )


class Both:
    """Hands each layer to a capture and to a recorder, to see what the recorder kept by reference."""

    wants_lse = True

    def __init__(self, capture: Capture, recorder: PrefillRecorder) -> None:
        self.capture, self.recorder = capture, recorder

    def record_layer(self, layer: int, activations: LayerActivations) -> None:
        self.capture.record_layer(layer, activations)
        self.recorder.record_layer(layer, activations)


@pytest.mark.parametrize(
    ("lengths", "keep", "shared"),
    [
        ([7], [True], True),  # a prompt alone: the forward's own tensors become the record
        ([7, 5], [True, True], True),  # every prompt of the step kept: each record is a view of the buffers
        ([7, 5], [True, False], False),  # 7 of 12 rows kept: a view would hold the other prompt's rows
    ],
)
def test_kept_prompts_owning_the_steps_buffers_are_kept_without_copies(
    tiny_checkpoints: dict[str, Path], lengths: list[int], keep: list[bool], shared: bool
) -> None:
    model = load_model(tiny_checkpoints["qwen3"])
    capture = Capture()
    cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    ids = torch.arange(sum(lengths))
    recorder = PrefillRecorder(
        RecordingPolicy.FULL, cu, ids, num_layers=2, version=0, qk_norm=True, keep=keep
    )
    prefill(model, lengths, Both(capture, recorder))
    records = recorder.records()
    for seq, record in enumerate(records):
        assert (record is not None) == keep[seq]
        if record is None:
            continue
        start, end = cu[seq], cu[seq + 1]
        for layer in range(2):
            for name, tensor in record.layers[layer].items():
                source = getattr(capture.layers[layer], name)
                same = tensor.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
                assert same is shared, (lengths, keep, name)
                assert not tensor.is_inference() and torch.equal(tensor, source[start:end])
        # what the store counts is what the record holds: the forward's buffers, each once, or its copies
        held = record.nbytes()
        if shared:
            assert held == sum(
                getattr(capture.layers[i], n).nbytes for i in range(2) for n in record.layers[i]
            )
        else:
            assert held == sum(t.nbytes for layer in record.layers for t in layer.values())
    if shared and len(lengths) > 1:  # two records, one copy of the buffers in a store
        store = ActivationStore(StoreConfig(device_budget_bytes=0, host_budget_bytes=1 << 30))
        kept = [r for r in records if r is not None]
        for i, record in enumerate(kept):
            store.put(str(i), record)
        assert store.host_bytes == kept[0].nbytes() == kept[1].nbytes()


def test_a_prompt_beside_a_few_other_rows_is_kept_as_views_and_counted_whole() -> None:
    """vLLM puts decode rows beside a prompt: a view of the buffer holds them too, and the bytes say so."""
    x = torch.randn(34, 8)
    gate_up = torch.randn(34, 12)
    acts = synthetic_layer(x, gate_up, lse=None, handed_over={"x", "gate", "up"})
    recorder = PrefillRecorder(
        RecordingPolicy.KV, [0, 2, 34], torch.arange(34), num_layers=1, version=0, keep=[False, True]
    )
    recorder.record_layer(0, acts)
    (record,) = [r for r in recorder.records() if r is not None]
    layer = record.layers[0]
    assert layer["x"].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()  # 32 of 34 rows
    assert layer["k"].untyped_storage().data_ptr() != x.untyped_storage().data_ptr()  # not handed over
    assert torch.equal(layer["x"], x[2:]) and torch.equal(layer["k"], x.view(34, 2, 4)[2:])
    assert record.nbytes() == x.nbytes + 2 * 32 * 8 * 4  # the whole buffer x, and the copied k and v

    # gate and up together are (most of) one fused buffer: views of it, the buffer counted once
    full = PrefillRecorder(
        RecordingPolicy.FULL, [0, 2, 34], torch.arange(34), num_layers=1, version=0, keep=[False, True]
    )
    full.record_layer(0, replace(acts, lse=torch.zeros(34, 2)))
    (layer,) = next(r for r in full.records() if r is not None).layers
    assert layer["gate"].untyped_storage().data_ptr() == layer["up"].untyped_storage().data_ptr()
    assert layer["gate"].untyped_storage().data_ptr() == gate_up.untyped_storage().data_ptr()
    assert torch.equal(layer["up"], gate_up[2:, 6:])


def test_bfloat16_records_copy_into_bfloat16_and_keep_the_statistics_in_fp32(
    tiny_checkpoints: dict[str, Path],
) -> None:
    model = load_model(tiny_checkpoints["llama"])
    capture = Capture()
    recorder = PrefillRecorder(
        RecordingPolicy.FULL, [0, 6], torch.arange(6), num_layers=2, version=0, record_dtype=torch.bfloat16
    )
    prefill(model, [6], Both(capture, recorder))
    record = recorder.records()[0]
    assert record is not None
    for layer in range(2):
        for name, tensor in record.layers[layer].items():
            source = getattr(capture.layers[layer], name)
            expected = source.float() if name == "lse" else source.to(torch.bfloat16)
            assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name
    fp32 = sum(getattr(capture.layers[0], n).nbytes for n in record.layers[0])
    assert record.layer_nbytes(0) < 0.6 * fp32


def test_the_copy_thread_copies_what_the_forward_no_longer_writes_and_the_rest_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fields handed over are copied on the copy thread; a field the forward may still write is copied
    during the hook, before the write; a bfloat16 model's fields go through the byte copy unchanged."""
    threads: set[str] = set()
    plain_copy = recorder_module._plain_copy
    released = threading.Event()  # background copies wait until the forward has written x

    def watched(source: torch.Tensor, into: torch.Tensor) -> None:
        threads.add(threading.current_thread().name)
        assert released.wait(timeout=30)
        plain_copy(source, into)

    monkeypatch.setattr(recorder_module, "_plain_copy", watched)
    copy_thread = CopyThread()
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(20, 8).to(dtype)
        gate_up = torch.randn(20, 12).to(dtype)
        acts = synthetic_layer(x, gate_up, lse=torch.randn(20, 2), handed_over={"gate", "up", "lse"})
        before = {name: getattr(acts, name)[4:].clone() for name in ("x", "gate", "up", "lse")}
        recorder = PrefillRecorder(
            RecordingPolicy.FULL, [0, 4, 20], torch.arange(20), num_layers=1, version=0,
            keep=[False, True], copy_thread=copy_thread,
        )  # fmt: skip
        released.clear()
        recorder.record_layer(0, acts)
        x.zero_()  # the forward writes what it did not hand over: the record has the value of the hook call
        released.set()
        (record,) = [r for r in recorder.records() if r is not None]
        (layer,) = record.layers
        for name, value in before.items():
            assert layer[name].dtype == value.dtype and torch.equal(layer[name], value), (dtype, name)
            assert layer[name].is_contiguous() and not layer[name].is_inference()
    copy_thread.close()
    assert threads == {t for t in threads if t.startswith("record-copies")} and threads


def test_a_failed_background_copy_fails_the_records_call(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(source: torch.Tensor, into: torch.Tensor) -> None:
        raise MemoryError("no room for the copy")

    monkeypatch.setattr(recorder_module, "_plain_copy", broken)
    copy_thread = CopyThread()
    x = torch.randn(20, 8)
    acts = synthetic_layer(x, torch.randn(20, 12), lse=None, handed_over={"x"})
    recorder = PrefillRecorder(
        RecordingPolicy.KV, [0, 4, 20], torch.arange(20), num_layers=1, version=0, keep=[False, True],
        copy_thread=copy_thread,
    )  # fmt: skip
    recorder.record_layer(0, acts)
    with pytest.raises(MemoryError, match="no room"):
        recorder.records()
    copy_thread.close()
