"""Prefill activation records: recording policies, the recorder the model calls, the tiered store, and the
per-layer streaming a training step uses."""

from alchemist_worker.activations.policy import RecordingPolicy, parse_policy
from alchemist_worker.activations.recorder import PrefillRecorder
from alchemist_worker.activations.records import SequenceRecord, concat_records
from alchemist_worker.activations.store import (
    ActivationStore,
    DropReason,
    Lookup,
    StoreConfig,
    StoreStats,
    Tier,
)
from alchemist_worker.activations.transfer import LayerStreamer

__all__ = [
    "ActivationStore",
    "DropReason",
    "LayerStreamer",
    "Lookup",
    "PrefillRecorder",
    "RecordingPolicy",
    "SequenceRecord",
    "StoreConfig",
    "StoreStats",
    "Tier",
    "concat_records",
    "parse_policy",
]
