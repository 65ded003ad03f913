"""From a feedback entry to a training sample: the prompt that was served and the response to imitate.

An accepted answer is a desirable sample as generated; a corrected one has the user's text in place of the
generated response (tokenized, and ended like the original, so the model learns to stop). What a rejection
teaches depends on the objective (training/objectives.py): under `supervised` it trains nothing but still
counts for its version's acceptance rate; under the others the rejected answer is an undesirable sample, and a
correction also carries the answer it replaced (`replaced_tokens`, an undesirable answer to the same prompt:
a DPO pair, or one more undesirable sample for unlikelihood and KTO).

Where the tokens come from: the request record in Redis (`request:{id}`, written by whichever replica served
it, with a TTL). That makes the choice for feedback on another replica's request, or on one whose activation
record is gone: this trainer recomputes it from those tokens. We do not hand samples to the owning replica:
only one replica trains (see continual/lease.py), a hand-off would need a second queue and its own failure
handling, and the owner's record may be evicted by the time the sample arrives anyway. Reuse still happens for
every request this replica served and recorded; the training step decides per sample (hedging).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection
from dataclasses import dataclass

from alchemist_protocol.job_store import JobStore
from alchemist_protocol.schemas import FeedbackLabel, RequestRecord

from alchemist_worker.feedback.consumer import FeedbackItem


@dataclass(frozen=True)
class TrainingSample:
    """One sample of a step. `served_version` is the weight version of the prompt's prefill (its record's)."""

    feedback_id: str
    request_id: str
    prompt_tokens: tuple[int, ...]
    response_tokens: tuple[int, ...]
    served_version: int
    served_by: str  # the replica whose activation store may hold the prompt's record
    corrected: bool
    desirable: bool = True  # False: a rejected answer, to be moved away from
    replaced_tokens: tuple[int, ...] = ()  # a correction's served answer, when the objective trains on it

    @property
    def num_tokens(self) -> int:
        """Tokens the step processes: the replaced answer is a second sequence over the same prompt."""
        replaced = len(self.prompt_tokens) + len(self.replaced_tokens) if self.replaced_tokens else 0
        return len(self.prompt_tokens) + len(self.response_tokens) + replaced


class SkipKind(enum.Enum):
    NOT_TRAINED = "not_trained"  # valid and counted, but the objective learns nothing from it
    DEAD = "dead"  # cannot be trained: goes to the dead-letter stream with the reason


@dataclass(frozen=True)
class Skip:
    kind: SkipKind
    reason: str
    served_version: int | None = None


class SampleResolver:
    def __init__(
        self,
        store: JobStore,
        encode: Callable[[str], list[int]],
        stop_token_ids: Collection[int],
        max_tokens: int,
        end_token: int | None = None,
        train_rejections: bool = False,
    ) -> None:
        """`end_token` ends a correction when the original response did not end with a stop token;
        `train_rejections`: the objective learns from rejected answers (objectives.trains_rejections)."""
        self.train_rejections = train_rejections
        self.store = store
        self.encode = encode
        self.stop_token_ids = frozenset(stop_token_ids)
        self.max_tokens = max_tokens
        self.end_token = end_token

    def resolve(self, item: FeedbackItem) -> TrainingSample | Skip:
        """Raises redis errors (transient: retry later); returns Skip for what cannot or need not train."""
        feedback = item.feedback
        record = self.store.get_request(feedback.request_id)
        if record is None:
            return Skip(
                SkipKind.DEAD,
                f"request {feedback.request_id!r} is unknown here: no request record in Redis (never served "
                "by this job, or its record expired)",
            )
        rejected = feedback.label is FeedbackLabel.NEGATIVE
        if rejected and not self.train_rejections:
            return Skip(SkipKind.NOT_TRAINED, "rejected answers are not imitated", record.version)
        response = self.response_tokens(record, feedback.correction)
        if not response:
            return Skip(SkipKind.DEAD, f"request {record.request_id!r} has an empty response", record.version)
        if not record.prompt_tokens:
            return Skip(SkipKind.DEAD, f"request {record.request_id!r} has an empty prompt", record.version)
        total = len(record.prompt_tokens) + len(response)
        if total > self.max_tokens:
            return Skip(
                SkipKind.DEAD,
                f"prompt and response are {total} tokens, more than the {self.max_tokens} a step may hold",
                record.version,
            )
        corrected = feedback.label is FeedbackLabel.CORRECTION
        replaced: tuple[int, ...] = ()
        if corrected and self.train_rejections and record.response_tokens:
            replaced = tuple(record.response_tokens)
            if total + len(record.prompt_tokens) + len(replaced) > self.max_tokens:
                replaced = ()  # the pair does not fit a step: the correction still trains on its own
        return TrainingSample(
            feedback_id=item.feedback_id,
            request_id=record.request_id,
            prompt_tokens=tuple(record.prompt_tokens),
            response_tokens=tuple(response),
            served_version=record.version,
            served_by=record.replica,
            corrected=corrected,
            desirable=not rejected,
            replaced_tokens=replaced,
        )

    def response_tokens(self, record: RequestRecord, correction: str | None) -> list[int]:
        """The response a sample imitates: as served, or the correction ended like the original."""
        if correction is None:
            return list(record.response_tokens)
        tokens = self.encode(correction)
        original = record.response_tokens
        end = original[-1] if original and original[-1] in self.stop_token_ids else self.end_token
        if tokens and end is not None and tokens[-1] != end:
            tokens.append(end)  # a correction is a whole answer: the model should learn to stop after it
        return tokens
