"""Hedging: per sample, reuse its prefill record or recompute the prompt, and say why.

Most requests never get feedback and feedback arrives late, so a record may be gone or unusable when its
sample is trained on. Such a sample is recomputed in the same step (nothing is lost but the saving). A record
is reused only if it is in the store, was made under a policy the trainer accepts, by this model shape, over
exactly the sample's prompt from position 0, and at most `max_staleness` weight versions ago. Reuse of a record
made at version v by weights at version v' > v gives an approximate gradient; max_staleness = 0 keeps the
step exact.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum

import torch

from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.activations.records import SequenceRecord
from alchemist_worker.activations.store import Lookup
from alchemist_worker.model.config import ModelConfig
from alchemist_worker.training.batch import TrainingSample


class Decision(StrEnum):
    REUSED = "reused"
    RECOMPUTED = "recomputed"


class Reason(StrEnum):
    NOT_RECORDED = "not_recorded"  # the sample names no record (recording is sampled)
    MISSING = "missing"  # the store never had it, or forgot it
    EVICTED = "evicted"  # pushed out of the store under memory pressure
    EXPIRED = "expired"  # older than the store's TTL
    TOO_LARGE = "too_large"  # did not fit the store at all
    INCOMPATIBLE_POLICY = "incompatible_policy"
    INCOMPATIBLE_RECORD = "incompatible_record"  # other model shape (layers, QK norm)
    PROMPT_MISMATCH = "prompt_mismatch"  # covers other tokens than the sample's prompt
    STALE = "stale"  # more than max_staleness versions old (or from a version ahead of the weights)


@dataclass(frozen=True)
class SampleOutcome:
    sample_id: str
    decision: Decision
    reason: Reason | None = None
    detail: str = ""
    record_version: int | None = None


def decide(
    sample: TrainingSample,
    lookup: Lookup | None,
    *,
    model_config: ModelConfig,
    accepted_policies: Collection[RecordingPolicy],
    current_version: int,
    max_staleness: int,
) -> SampleOutcome:
    """Whether `sample` can reuse the record found for it (lookup is None when it names no record)."""

    def recompute(reason: Reason, detail: str = "", version: int | None = None) -> SampleOutcome:
        return SampleOutcome(sample.sample_id, Decision.RECOMPUTED, reason, detail, version)

    if lookup is None or sample.record_id is None:
        return recompute(Reason.NOT_RECORDED)
    record: SequenceRecord | None = lookup.record
    if record is None:
        assert lookup.reason is not None
        return recompute(Reason(lookup.reason.value))
    if record.policy not in accepted_policies:
        accepted = sorted(p.value for p in accepted_policies)
        return recompute(Reason.INCOMPATIBLE_POLICY, f"recorded {record.policy.value}, accepted {accepted}")
    if record.num_layers != model_config.num_layers or record.qk_norm != model_config.qk_norm:
        return recompute(Reason.INCOMPATIBLE_RECORD, f"{record.num_layers} layers, qk_norm={record.qk_norm}")
    if record.start_position != 0 or not torch.equal(record.token_ids, sample.prompt_ids.cpu()):
        return recompute(
            Reason.PROMPT_MISMATCH,
            f"record covers {record.num_tokens} tokens from position "
            f"{record.start_position}, prompt has {sample.prompt_len}",
        )
    age = current_version - record.version
    if age < 0 or age > max_staleness:
        return recompute(
            Reason.STALE,
            f"recorded at version {record.version}, weights at {current_version}",
            record.version,
        )
    return SampleOutcome(sample.sample_id, Decision.REUSED, record_version=record.version)
