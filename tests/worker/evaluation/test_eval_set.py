"""Evaluation set files: both item kinds, windows over long text, and clear errors for malformed ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from alchemist_worker.evaluation.eval_set import (
    InvalidEvaluationSet,
    ReferenceItem,
    TextItem,
    encode_eval_set,
    load_eval_set,
    parse_eval_set,
)
from alchemist_worker.evaluation.settings import EvaluationSettings


def lines(*items: object) -> bytes:
    return "\n".join(json.dumps(i) for i in items).encode()


def test_both_kinds_parse_and_the_digest_names_the_content(tmp_path: Path) -> None:
    content = lines(
        {"text": "Held-out prose."},
        {"prompt": "Capital of France?", "reference": "Paris"},
        {"messages": [{"role": "user", "content": "2+2?"}], "reference": "4"},
    )
    path = tmp_path / "eval.jsonl"
    path.write_bytes(content + b"\n\n")
    eval_set = load_eval_set(path)
    assert [type(i) for i in eval_set.items] == [TextItem, ReferenceItem, ReferenceItem]
    assert len(eval_set.texts) == 1 and len(eval_set.references) == 2
    assert eval_set.digest == parse_eval_set(content + b"\n\n", "x").digest
    assert eval_set.digest != parse_eval_set(content, "x").digest


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no items"),
        (b"{not json}\n", "line 1: not JSON"),
        (lines({"text": "ok"}, [1, 2]), "line 2: expected a JSON object, got list"),
        (lines({"question": "?"}), "line 1: an item needs 'text'"),
        (lines({"text": ""}), "line 1: text: String should have at least 1 character"),
        (lines({"reference": "x"}), "line 1: .*exactly one of 'prompt' and 'messages'"),
        (
            lines({"prompt": "p", "messages": [{"role": "user", "content": "q"}], "reference": "x"}),
            "exactly one",
        ),
        (
            lines({"messages": [{"role": "robot", "content": "q"}], "reference": "x"}),
            r"line 1: messages\.0\.role",
        ),
        (lines({"text": "a", "weight": 2}), "line 1: weight: Extra inputs are not permitted"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_malformed_sets_name_the_line_and_the_problem(content: bytes, message: str) -> None:
    with pytest.raises(InvalidEvaluationSet, match=message):
        parse_eval_set(content, "eval.jsonl")


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidEvaluationSet, match="does not exist"):
        load_eval_set(tmp_path / "absent.jsonl")


def encode_chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_long_text_is_scored_in_windows_and_references_must_fit() -> None:
    eval_set = parse_eval_set(lines({"text": "abcdefghij"}, {"prompt": "pq", "reference": "rs"}), "s")
    items = encode_eval_set(eval_set, encode_chars, lambda m: [1], max_tokens=4)
    texts = [i for i in items if not i.reference]
    # Windows of 4 tokens overlapping by one, so every token after the first is predicted exactly once.
    assert [i.context + i.targets for i in texts] == [
        encode_chars("abcd"),
        encode_chars("defg"),
        encode_chars("ghij"),
    ]
    assert sum(len(i.targets) for i in texts) == 9
    assert [(i.context, i.targets) for i in items if i.reference] == [
        (encode_chars("pq"), encode_chars("rs"))
    ]
    too_long = parse_eval_set(lines({"prompt": "pqr", "reference": "st"}), "s")
    with pytest.raises(InvalidEvaluationSet, match="s item 1: 5 tokens, more than the 4"):
        encode_eval_set(too_long, encode_chars, lambda m: [1], max_tokens=4)


def test_settings_from_the_environment() -> None:
    assert EvaluationSettings.from_env({}).path is None
    settings = EvaluationSettings.from_env(
        {
            "ALCHEMIST_EVALUATION_SET": "/data/eval.jsonl",
            "ALCHEMIST_EVALUATION_MAX_PERPLEXITY_INCREASE": "0.1",
        }
    )
    assert settings.path == Path("/data/eval.jsonl") and settings.bounds.max_perplexity_increase == 0.1
    with pytest.raises(ValueError, match="ALCHEMIST_EVALUATION_MAX_EXACT_MATCH_DROP='x'"):
        EvaluationSettings.from_env({"ALCHEMIST_EVALUATION_MAX_EXACT_MATCH_DROP": "x"})
    with pytest.raises(ValueError, match="max_perplexity_increase must be between 0 and 10"):
        EvaluationSettings.from_env({"ALCHEMIST_EVALUATION_MAX_PERPLEXITY_INCREASE": "-1"})
