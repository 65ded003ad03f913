"""The job's evaluation set: a JSONL file, one item a line, read once when the worker starts.

Two kinds of item:
- `{"text": "..."}`: held-out plain text, scored by perplexity (does the model still model language?);
- `{"prompt": "...", "reference": "..."}` or `{"messages": [...], "reference": "..."}`: a question with its
  reference answer, scored by the answer's log-likelihood and by exact match (does greedy decoding start with
  the reference?). `messages` go through the checkpoint's chat template, `prompt` is used as is.
A malformed line is an error that names the file, the line and what to fix: a gate that silently skipped
items would judge versions on a different set than the one the job names.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_ITEMS = 10_000
ROLES = ("system", "user", "assistant")


class InvalidEvaluationSet(ValueError):
    """The evaluation set cannot be used; the message names the file and line."""


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


class TextItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field(min_length=1)


class ReferenceItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str | None = Field(default=None, min_length=1)
    messages: tuple[Message, ...] | None = Field(default=None, min_length=1)
    reference: str = Field(min_length=1)

    @model_validator(mode="after")
    def _one_prompt(self) -> ReferenceItem:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        return self


EvaluationItem = TextItem | ReferenceItem


@dataclass(frozen=True)
class EvaluationSet:
    source: str
    items: tuple[EvaluationItem, ...]
    digest: str  # sha256 of the file's bytes: readings are compared only on the same set

    @property
    def texts(self) -> list[TextItem]:
        return [i for i in self.items if isinstance(i, TextItem)]

    @property
    def references(self) -> list[ReferenceItem]:
        return [i for i in self.items if isinstance(i, ReferenceItem)]


def parse_item(raw: str) -> EvaluationItem:
    """One JSONL line as an item; raises ValueError with a one-line reason."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    model: type[TextItem] | type[ReferenceItem] = TextItem if "text" in data else ReferenceItem
    if "text" not in data and "reference" not in data:
        raise ValueError("an item needs 'text' (perplexity) or 'reference' with 'prompt' or 'messages'")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'item'}: {err['msg']}" for err in exc.errors()
        )
        raise ValueError(problems) from None


def parse_eval_set(content: bytes, source: str) -> EvaluationSet:
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvaluationSet(f"{source}: not UTF-8 (byte offset {exc.start})") from None
    items: list[EvaluationItem] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(parse_item(line))
        except ValueError as exc:
            raise InvalidEvaluationSet(f"{source} line {number}: {exc}") from None
        if len(items) > MAX_ITEMS:
            raise InvalidEvaluationSet(
                f"{source}: more than {MAX_ITEMS} items; an evaluation set must stay small"
            )
    if not items:
        raise InvalidEvaluationSet(f"{source}: no items (one JSON object per line)")
    return EvaluationSet(source, tuple(items), hashlib.sha256(content).hexdigest())


def load_eval_set(path: Path) -> EvaluationSet:
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise InvalidEvaluationSet(f"evaluation set {path} does not exist") from None
    except OSError as exc:
        raise InvalidEvaluationSet(f"cannot read evaluation set {path}: {exc}") from None
    return parse_eval_set(content, str(path))


@dataclass(frozen=True)
class EncodedItem:
    """Token ids of one scored sequence: `targets` are predicted from `context` (and the targets before)."""

    context: list[int]
    targets: list[int]
    reference: bool  # a reference answer (NLL and exact match), else plain text (perplexity)


def encode_eval_set(
    eval_set: EvaluationSet,
    encode_text: Callable[[str], list[int]],
    encode_chat: Callable[[list[dict[str, str]]], list[int]],
    max_tokens: int,
) -> list[EncodedItem]:
    """Tokenizes every item; text longer than `max_tokens` is scored in consecutive windows of that size."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
    out: list[EncodedItem] = []
    for n, item in enumerate(eval_set.items, start=1):
        if isinstance(item, TextItem):
            ids = list(encode_text(item.text))
            for start in range(0, max(0, len(ids) - 1), max_tokens - 1):
                window = ids[start : start + max_tokens]
                if len(window) >= 2:
                    out.append(EncodedItem(window[:1], window[1:], reference=False))
            continue
        if item.messages is not None:
            context = list(encode_chat([m.model_dump() for m in item.messages]))
        else:
            context = list(encode_text(item.prompt or ""))
        targets = list(encode_text(item.reference))
        if not context or not targets:
            raise InvalidEvaluationSet(f"{eval_set.source} item {n}: its prompt or reference has no tokens")
        if len(context) + len(targets) > max_tokens:
            raise InvalidEvaluationSet(
                f"{eval_set.source} item {n}: {len(context) + len(targets)} tokens, more than the {max_tokens} "
                "the model scores at once; shorten its prompt or reference"
            )
        out.append(EncodedItem(context, targets, reference=True))
    if not out:
        raise InvalidEvaluationSet(f"{eval_set.source}: no item has at least two tokens to score")
    return out
