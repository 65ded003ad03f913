"""Message schemas of the Redis protocol, validated with pydantic.

Stream entries are flat string maps (that is what XADD stores); everything else is JSON. Parsing never crashes a
consumer: `parse_feedback` raises `InvalidFeedback` with a reason that goes to the dead-letter stream.
"""

from __future__ import annotations

import base64
import enum
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class FeedbackLabel(enum.StrEnum):
    POSITIVE = "positive"
    NEGATIVE = "negative"
    CORRECTION = "correction"


class InvalidFeedback(ValueError):
    """A feedback entry that cannot be trained on; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Feedback(BaseModel):
    """One user reaction to one served response (its id is the response id the API returned)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str = Field(min_length=1, max_length=256)
    label: FeedbackLabel
    correction: str | None = Field(default=None, max_length=100_000)
    rating: float | None = Field(default=None, ge=-1.0, le=1.0)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=256)
    timestamp: float = Field(default_factory=time.time, gt=0)

    @model_validator(mode="after")
    def _correction_matches_label(self) -> Feedback:
        if self.label is FeedbackLabel.CORRECTION and not self.correction:
            raise ValueError("label 'correction' needs a non-empty 'correction' text")
        if self.label is not FeedbackLabel.CORRECTION and self.correction is not None:
            raise ValueError(
                f"'correction' text is only allowed with label 'correction', not {self.label.value!r}"
            )
        return self

    def feedback_id(self, entry_id: str) -> str:
        """Identity for deduplication: the application's idempotency key, else the stream entry id."""
        return self.idempotency_key or f"entry:{entry_id}"

    def to_fields(self) -> dict[str, str]:
        fields = {"request_id": self.request_id, "label": self.label.value, "timestamp": repr(self.timestamp)}
        if self.correction is not None:
            fields["correction"] = self.correction
        if self.rating is not None:
            fields["rating"] = repr(self.rating)
        if self.idempotency_key is not None:
            fields["idempotency_key"] = self.idempotency_key
        return fields


# A dead letter keeps at most this much of each original field: enough to see what was sent, and the
# dead-letter stream stays small however large the entries were.
DEAD_LETTER_FIELD_BYTES = 4096


def _strict_text(value: str | bytes, what: str) -> str:
    """UTF-8 text of a raw field, or InvalidFeedback saying which field and where it stops decoding."""
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidFeedback(
            f"undecodable entry: {what} is not UTF-8 (byte 0x{value[exc.start]:02x} at offset {exc.start})"
        ) from None


def parse_feedback(fields: dict[Any, Any]) -> Feedback:
    """Validates a raw stream entry (text or bytes, as read); raises InvalidFeedback with a one-line reason.

    Bytes that are not UTF-8 are a reason, never replaced: the entry is not what its sender meant.
    """
    try:
        data: dict[str, str] = {}
        for key, value in fields.items():
            name = _strict_text(key, f"a field name ({key!r:.60})")
            data[name] = _strict_text(value, f"field {name!r}")
        return Feedback.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'entry'}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidFeedback(problems) from None
    except (UnicodeError, TypeError, AttributeError) as exc:
        raise InvalidFeedback(f"undecodable entry: {exc}") from None


def dead_letter_fields(
    entry_id: str, fields: dict[Any, Any], reason: str, max_field_bytes: int = DEAD_LETTER_FIELD_BYTES
) -> dict[str, str]:
    """A dead-letter entry: the reason, where it came from, and the original fields, each cut to
    `max_field_bytes`: text under `orig.<name>`, bytes that are not UTF-8 base64-encoded under
    `orig_b64.<name>` (a name that is not UTF-8 is written with backslash escapes). `truncated` lists the
    fields that were cut, with their original sizes in bytes."""
    out = {"reason": reason[:max_field_bytes], "source_id": entry_id, "dead_at": repr(time.time())}
    cut: list[str] = []
    for key, value in fields.items():
        name = key.decode("utf-8", errors="backslashreplace") if isinstance(key, bytes) else str(key)
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8", errors="surrogatepass")
        kept = raw[:max_field_bytes]
        if len(raw) > max_field_bytes:
            cut.append(f"{name}:{len(raw)}")
        try:
            out[f"orig.{name}"] = raw.decode("utf-8") if len(raw) <= max_field_bytes else _cut_text(kept)
        except UnicodeDecodeError:
            out[f"orig_b64.{name}"] = base64.b64encode(kept).decode("ascii")
    if cut:
        out["truncated"] = ",".join(cut)
    return out


def _cut_text(kept: bytes) -> str:
    """The UTF-8 text of a cut field: a character split by the cut is dropped, anything else undecodable raises."""
    for drop in range(4):
        try:
            return kept[: len(kept) - drop].decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(kept) - 4:
                raise
    raise UnicodeDecodeError("utf-8", kept, 0, len(kept), "not UTF-8")


class RequestRecord(BaseModel):
    """What any replica needs to recompute a served request's training sample."""

    model_config = ConfigDict(extra="forbid")

    request_id: str
    prompt_tokens: list[int]
    response_tokens: list[int]
    replica: str
    version: int = Field(ge=0)
    model: str
    recorded: bool = False
    created_at: float = Field(default_factory=time.time)


class ArtifactKind(enum.StrEnum):
    LORA = "lora"
    FULL = "full"


class EvaluationScores(BaseModel):
    """One model version's scores on the job's evaluation set (None where the set has no such items)."""

    model_config = ConfigDict(extra="forbid")

    perplexity: float | None = Field(default=None, gt=0)  # over the plain-text items
    reference_nll: float | None = Field(default=None, ge=0)  # mean per-token NLL of the reference answers
    exact_match: float | None = Field(
        default=None, ge=0, le=1
    )  # share of references greedy decoding starts with
    text_tokens: int = Field(default=0, ge=0)
    reference_items: int = Field(default=0, ge=0)


class GateDecision(enum.StrEnum):
    PASSED = "passed"  # may be rolled out
    HELD = "held"  # regressed beyond a bound: never rolled out


class EvaluationReading(BaseModel):
    """The evaluation gate's reading of a candidate version, made by the trainer before it was published."""

    model_config = ConfigDict(extra="forbid")

    set_digest: str  # which evaluation set (sha256 of its file): readings of other sets are not compared
    scores: EvaluationScores
    base: EvaluationScores  # version 0 on the same set
    parent: int = Field(ge=0)
    parent_scores: EvaluationScores | None = None  # None when the parent has no reading on this set
    decision: GateDecision
    reasons: list[str] = Field(default_factory=list)  # one line per bound that failed (empty when passed)

    @property
    def held(self) -> bool:
        return self.decision is GateDecision.HELD


class VersionInfo(BaseModel):
    """A published model version: a PEFT adapter or full safetensors weights, and its lineage."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1)
    parent: int = Field(ge=0)
    kind: ArtifactKind
    path: str
    created_at: float = Field(default_factory=time.time)
    loss: float | None = None
    samples: int = Field(default=0, ge=0)
    training: dict[str, Any] = Field(default_factory=dict)
    feedback_ranges: list[tuple[str, str]] = Field(default_factory=list)
    trained_by: str = ""
    evaluation: EvaluationReading | None = (
        None  # the gate's reading; None when the job names no evaluation set
    )

    @property
    def held(self) -> bool:
        """Whether the evaluation gate holds this version back from every rollout."""
        return self.evaluation is not None and self.evaluation.held


class ReplicaState(BaseModel):
    """What a replica reports on each heartbeat."""

    model_config = ConfigDict(extra="forbid")

    replica: str
    loaded_version: int = Field(ge=0)
    ready: bool
    heartbeat_at: float = Field(default_factory=time.time)
    feedback_lag: int = Field(default=0, ge=0)
    # "class: message" while the trainer's version commits keep failing (io, redis); "" when they succeed.
    commit_error: str = ""


class RolloutPointer(BaseModel):
    """Which version each replica must serve. Version 0 is the base model."""

    model_config = ConfigDict(extra="forbid")

    stable_version: int = Field(default=0, ge=0)
    canary_version: int | None = Field(default=None, ge=1)
    canary_replicas: list[str] = Field(default_factory=list)
    updated_at: float = Field(default_factory=time.time)

    def version_for(self, replica: str) -> int:
        if self.canary_version is not None and replica in self.canary_replicas:
            return self.canary_version
        return self.stable_version


class RollbackRequest(BaseModel):
    """A command to return to a kept version.

    `superseded_up_to` is the latest published version when the command was given: the trainer honours the
    request while its own head is at most that number (it reloads `version`, and its next version has `version`
    as parent), and stops once it has published past it. So a restart mid-way honours it again, and an old
    request never drags a newer lineage back.
    """

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=0)
    superseded_up_to: int = Field(ge=0)
    reason: str = ""
    requested_at: float = Field(default_factory=time.time)

    @model_validator(mode="after")
    def _not_forward(self) -> RollbackRequest:
        if self.version > self.superseded_up_to:
            raise ValueError(
                f"cannot roll back to version {self.version}: the latest published is {self.superseded_up_to}"
            )
        return self

    def applies_to(self, head_version: int) -> bool:
        """True while a trainer whose newest published version is `head_version` must honour it."""
        return head_version <= self.superseded_up_to
