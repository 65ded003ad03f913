"""Incremental detokenization equals decoding everything at once; stop strings cut the text and are held back."""

from __future__ import annotations

from pathlib import Path

import pytest
from alchemist_worker.engine.detokenizer import IncrementalDetokenizer
from tokenizers import Tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld, 世界! emoji 🙂 done",
    "def add(a, b):\n    return a + b\n",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoints: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_checkpoints["llama"] / "tokenizer.json"))


def decoder(tok: Tokenizer):  # type: ignore[no-untyped-def]
    return lambda ids: tok.decode(list(ids), skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_matches_full_decode(tokenizer: Tokenizer, text: str) -> None:
    prompt = tokenizer.encode("user: hello!").ids
    output = tokenizer.encode(text).ids
    detok = IncrementalDetokenizer(decoder(tokenizer), prompt)
    pieces = [detok.push(t) for t in output]
    assert "".join(pieces) == detok.text == tokenizer.decode(output, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_truncates_and_is_excluded(tokenizer: Tokenizer) -> None:
    output = tokenizer.encode("one two three four five").ids
    detok = IncrementalDetokenizer(decoder(tokenizer), [1], stop=["three", "nine"])
    for t in output:
        detok.push(t)
        if detok.stopped_by:
            break
    assert detok.stopped_by == "three"
    assert detok.text == "one two "
    assert detok.take_stream_delta(finished=True) == "one two "


def test_streaming_holds_back_possible_stop_prefix(tokenizer: Tokenizer) -> None:
    output = tokenizer.encode("abc STOP here").ids
    detok = IncrementalDetokenizer(decoder(tokenizer), [1], stop=["STOP"])
    streamed = ""
    for t in output:
        detok.push(t)
        streamed += detok.take_stream_delta(finished=bool(detok.stopped_by))
        # Never stream anything that could be the start of the stop string.
        assert "S" not in streamed
        if detok.stopped_by:
            break
    assert streamed == "abc " and detok.stopped_by == "STOP"


def test_without_stop_strings_nothing_is_held_back(tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(decoder(tokenizer), [1])
    for t in tokenizer.encode("lazy dog").ids:
        detok.push(t)
    assert detok.take_stream_delta(finished=False) == "lazy dog"


def test_flush_emits_an_incomplete_character_at_the_end(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("世").ids
    assert len(ids) > 1  # a multi-byte character split over byte-level tokens
    detok = IncrementalDetokenizer(decoder(tokenizer), [1])
    assert detok.push(ids[0]) == ""  # waits for the rest of the character
    detok.flush()
    assert detok.text == tokenizer.decode(ids[:1]) and detok.text.endswith("\ufffd")
