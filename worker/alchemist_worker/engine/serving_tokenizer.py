"""The tokenizer as serving uses it: prompts in, text out, chat messages rendered with the checkpoint's template.

A thin adapter over `model.tokenizer.Tokenizer` that fixes serving's conventions in one place: completions
prompts get the tokenizer's own special tokens, chat prompts get exactly what the template writes (the
template adds BOS itself, as HF's `apply_chat_template` assumes), and generated text skips special tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from alchemist_worker.model.tokenizer import Tokenizer


class ServingTokenizer:
    def __init__(self, tokenizer: Tokenizer, eos_token_ids: Sequence[int] = ()) -> None:
        self.inner = tokenizer
        eos = set(eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.vocab_size = tokenizer.vocab_size

    @classmethod
    def from_pretrained(cls, path: Path, model_eos_ids: Sequence[int] = ()) -> ServingTokenizer:
        """Reads the tokenizer and the end-of-sequence ids of config.json and generation_config.json."""
        eos = list(model_eos_ids)
        generation = path / "generation_config.json"
        if generation.is_file():
            value = json.loads(generation.read_text()).get("eos_token_id")
            eos.extend(value if isinstance(value, list) else [] if value is None else [value])
        return cls(Tokenizer(path), eos)

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=True)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.inner.decode(list(token_ids), skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token's text, for log probabilities (may be a partial character for byte-level tokens)."""
        return self.inner.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.inner.apply_chat_template(messages, add_generation_prompt=True)
        return self.inner.encode(text, add_special_tokens=False)
