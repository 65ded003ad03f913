"""The activation store: placement by budget, oldest-first spill and eviction, TTL, exact byte accounting."""

import pytest
import torch
from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.activations.records import SequenceRecord
from alchemist_worker.activations.store import ActivationStore, DropReason, StoreConfig, Tier


def record(tokens: int, layers: int = 2, width: int = 8, version: int = 0) -> SequenceRecord:
    """A kv-policy record of exactly tokens * layers * (width + 2 * width) * 4 bytes."""
    return SequenceRecord(
        policy=RecordingPolicy.KV,
        version=version,
        token_ids=torch.arange(tokens),
        layers=[
            {
                "x": torch.randn(tokens, width),
                "k": torch.randn(tokens, 1, width),
                "v": torch.randn(tokens, 1, width),
            }
            for _ in range(layers)
        ],
    )


SIZE_10 = 10 * 2 * 3 * 8 * 4  # bytes of record(10)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_accounting_is_exact_and_follows_every_move() -> None:
    store = ActivationStore(StoreConfig(device_budget_bytes=SIZE_10 * 2, host_budget_bytes=SIZE_10 * 10))
    assert record(10).nbytes() == SIZE_10
    assert store.put("a", record(10)) is Tier.DEVICE
    assert store.put("b", record(10)) is Tier.DEVICE
    assert (store.device_bytes, store.host_bytes) == (2 * SIZE_10, 0)
    assert store.put("c", record(10)) is Tier.DEVICE  # "a", the oldest, spills to the host
    assert store.tier_of("a") is Tier.HOST and store.tier_of("c") is Tier.DEVICE
    assert (store.device_bytes, store.host_bytes) == (2 * SIZE_10, SIZE_10)
    store.move_layer("b", 0, Tier.HOST)
    assert (store.device_bytes, store.host_bytes) == (2 * SIZE_10 - SIZE_10 // 2, SIZE_10 + SIZE_10 // 2)
    assert store.layer_tier("b", 0) is Tier.HOST and store.tier_of("b") is Tier.DEVICE
    store.pop("b")
    store.pop("c")
    assert (store.device_bytes, store.host_bytes) == (0, SIZE_10)
    stats = store.stats()
    assert stats.device_peak_bytes == 2 * SIZE_10 and stats.spilled == 1 and stats.puts == 3
    assert stats.host_records == 1 and stats.device_records == 0


def test_host_evicts_oldest_first_and_remembers_why() -> None:
    store = ActivationStore(StoreConfig(device_budget_bytes=0, host_budget_bytes=SIZE_10 * 2))
    for name in "abc":
        assert store.put(name, record(10)) is Tier.HOST
    assert "a" not in store and "b" in store and "c" in store
    assert store.lookup("a").reason is DropReason.EVICTED
    assert store.lookup("never").reason is DropReason.MISSING
    assert store.put("huge", record(100)) is Tier.DROPPED
    assert store.lookup("huge").reason is DropReason.TOO_LARGE
    assert store.host_bytes == 2 * SIZE_10  # the too-large put evicted nothing
    assert store.stats().dropped == {"evicted": 1, "too_large": 1}


def test_spill_drops_when_the_host_is_full() -> None:
    store = ActivationStore(StoreConfig(device_budget_bytes=SIZE_10, host_budget_bytes=0))
    store.put("a", record(10))
    store.put("b", record(10))
    assert store.lookup("a").reason is DropReason.EVICTED and store.tier_of("b") is Tier.DEVICE


def test_ttl_expires_records_but_not_acquired_ones() -> None:
    clock = Clock()
    store = ActivationStore(
        StoreConfig(device_budget_bytes=SIZE_10 * 4, host_budget_bytes=0, ttl_s=10.0), clock=clock
    )
    store.put("a", record(10))
    clock.now = 5.0
    store.put("b", record(10))
    store.acquire(["a"])
    clock.now = 12.0
    assert store.get("a") is not None  # in use by a step
    store.release(["a"])
    assert store.lookup("a").reason is DropReason.EXPIRED
    assert store.get("b") is not None
    clock.now = 16.0
    assert store.expire() == 1 and len(store) == 0 and store.device_bytes == 0


def test_acquired_records_are_not_evicted() -> None:
    store = ActivationStore(StoreConfig(device_budget_bytes=SIZE_10, host_budget_bytes=0))
    store.put("a", record(10))
    store.acquire(["a"])
    assert store.put("b", record(10)) is Tier.DROPPED
    assert store.get("a") is not None


def test_replacing_a_record_keeps_the_accounting() -> None:
    store = ActivationStore(StoreConfig(device_budget_bytes=SIZE_10 * 4, host_budget_bytes=0))
    store.put("a", record(10))
    store.put("a", record(5))
    assert store.device_bytes == SIZE_10 // 2 and len(store) == 1


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="budgets"):
        StoreConfig(device_budget_bytes=-1)
    with pytest.raises(ValueError, match="ttl_s"):
        StoreConfig(ttl_s=0)


def test_a_record_leaving_the_store_keeps_its_bytes_while_a_step_references_them() -> None:
    store = ActivationStore(StoreConfig(device_budget_bytes=SIZE_10, host_budget_bytes=SIZE_10))
    store.put("a", record(10))
    store.put("b", record(10))
    held_evicted = list(store.peek("a").layers)  # a step's fetched layers, then the record is evicted
    held_popped = list(store.peek("b").layers)  # ... or consumed
    want = [
        [{n: t.clone() for n, t in layer.items()} for layer in held] for held in (held_evicted, held_popped)
    ]
    store.pop("b")
    for i in range(8):  # churn records of the same size through the store's memory
        store.put(f"c{i}", record(10))
        for layer in store.peek(f"c{i}").layers:
            for t in layer.values():
                t.fill_(float(i))
    assert store.lookup("a").reason is DropReason.EVICTED and "b" not in store
    for held, expected in zip((held_evicted, held_popped), want, strict=True):
        for layer, layer_want in zip(held, expected, strict=True):
            assert all(torch.equal(layer[n], layer_want[n]) for n in layer)


def siblings(tokens: int = 10, layers: int = 2, width: int = 8) -> list[SequenceRecord]:
    """Two records of one prefill step holding views of the same buffers (each prompt's half of the rows)."""
    buffers = [
        {n: torch.randn(2 * tokens, *s) for n, s in (("x", (width,)), ("k", (1, width)), ("v", (1, width)))}
    ]
    buffers += [{n: torch.randn_like(t) for n, t in buffers[0].items()} for _ in range(layers - 1)]
    return [
        SequenceRecord(
            policy=RecordingPolicy.KV,
            version=0,
            token_ids=torch.arange(tokens),
            layers=[
                {n: t[half * tokens : (half + 1) * tokens] for n, t in layer.items()} for layer in buffers
            ],
        )
        for half in (0, 1)
    ]


def test_records_sharing_buffers_are_counted_once_and_freed_with_the_last() -> None:
    whole = 2 * SIZE_10  # the buffers both records are views of
    store = ActivationStore(StoreConfig(device_budget_bytes=0, host_budget_bytes=10 * SIZE_10))
    a, b = siblings()
    assert a.nbytes() == b.nbytes() == whole
    store.put("a", a)
    store.put("b", b)
    assert store.host_bytes == whole
    store.pop("a")
    assert store.host_bytes == whole  # b still holds all of it
    store.move_layer("b", 0, Tier.DEVICE)
    assert (store.device_bytes, store.host_bytes) == (whole // 2, whole // 2)
    store.pop("b")
    assert (store.device_bytes, store.host_bytes) == (0, 0)


def test_eviction_frees_a_shared_buffer_only_with_its_last_holder_and_stays_in_budget() -> None:
    budget = 3 * SIZE_10
    store = ActivationStore(StoreConfig(device_budget_bytes=0, host_budget_bytes=budget))
    store.put("old", record(10))
    a, b = siblings()
    store.put("a", a)
    store.put("b", b)  # adds nothing: its sibling holds its buffers, so nothing is evicted for it
    assert set(store._records) == {"old", "a", "b"} and store.host_bytes == 3 * SIZE_10
    store.put("c", record(10))  # the oldest goes
    assert set(store._records) == {"a", "b", "c"} and store.host_bytes == 3 * SIZE_10
    store.put("d", record(10))  # a alone frees nothing: b goes with it
    assert set(store._records) == {"c", "d"} and store.host_bytes == 2 * SIZE_10
    for i in range(4):  # siblings through a full store: never over budget, counted exactly
        for j, r in enumerate(siblings()):
            store.put(f"s{i}{j}", r)
            assert store.host_bytes <= budget
            buffers = {
                t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for rid in store._records
                for layer in store.peek(rid).layers
                for t in layer.values()
            }
            assert store.host_bytes == sum(buffers.values())
        assert f"s{i}0" in store and f"s{i}1" in store


def test_views_of_buffers_too_large_to_keep_whole_are_stored_as_copies_of_their_rows() -> None:
    """A tier smaller than the step's buffers but large enough for one prompt's rows still takes the prompt."""
    store = ActivationStore(StoreConfig(device_budget_bytes=0, host_budget_bytes=SIZE_10 * 3 // 2))
    a, b = siblings()
    want = [[{n: t.clone() for n, t in layer.items()} for layer in r.layers] for r in (a, b)]
    with torch.inference_mode():  # as an engine's step may run
        assert store.put("a", a) is Tier.HOST
        assert store.put("b", b) is Tier.HOST  # a goes: the tier holds one prompt's rows
    assert "a" not in store and store.host_bytes == SIZE_10 == b.nbytes()
    for layer, expected in zip(b.layers, want[1], strict=True):
        for name, t in layer.items():
            assert torch.equal(t, expected[name]) and not t.is_inference()
            assert t.untyped_storage().nbytes() == t.nbytes  # its own rows, nothing else
