"""bench/load_trace.py: prompts drawn inside the served model's vocabulary."""

from __future__ import annotations

import json
import random
from pathlib import Path

from bench.load_trace import random_prompt, vocab_size_of


def test_a_large_vocabulary_keeps_the_range_the_published_results_used() -> None:
    ids = random_prompt(random.Random(0), 2000, 49152)
    assert min(ids) >= 1000 and max(ids) < 30000


def test_a_small_vocabulary_gets_ids_it_has() -> None:
    ids = random_prompt(random.Random(0), 2000, 506)
    assert min(ids) >= 50 and max(ids) < 506
    assert len(set(ids)) > 300  # spread over the range, not one token


def test_the_vocabulary_size_comes_from_the_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 506, "hidden_size": 64}))
    assert vocab_size_of(tmp_path) == 506
