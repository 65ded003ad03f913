"""The tokenizer and chat template against HF's tokenizer on the same files."""

from pathlib import Path

import pytest
from alchemist_worker.bundled_model import ensure_small_model
from alchemist_worker.model import Tokenizer
from alchemist_worker.model.tokenizer import TokenizerError
from transformers import AutoTokenizer

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "hi! 0123"},
    {"role": "user", "content": "def add(a, b):\n    return a + b"},
]


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_matches_transformers(which: str, tiny_checkpoints: dict[str, Path]) -> None:
    # AutoTokenizer rebuilds Qwen2's pre-tokenizer from code instead of reading tokenizer.json; the llama
    # fixture's tokenizer is read from the file as is, like ours.
    path = tiny_checkpoints["llama"] if which == "tiny" else ensure_small_model()
    ours, ref = Tokenizer(path), AutoTokenizer.from_pretrained(path)
    for generation in (True, False):
        text = ours.apply_chat_template(MESSAGES, add_generation_prompt=generation)
        assert text == ref.apply_chat_template(MESSAGES, add_generation_prompt=generation, tokenize=False)
        ids = ours.encode(text)
        assert ids == ref(text).input_ids
        assert ours.decode(ids) == ref.decode(ids)
    assert ours.eos_token_id == ref.eos_token_id
    assert ours.vocab_size == len(ref)


def test_missing_template_and_file_are_errors(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"tokenizer.json does not exist"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((tiny_checkpoints["llama"] / "tokenizer.json").read_bytes())
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer(tmp_path).apply_chat_template(MESSAGES)
