"""scripts/gpu-check collects only the test files that hold GPU tests (found by their `pytest.mark.gpu`): a GPU
test marked another way would silently not run there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SELECTION = "grep -rl --include='test_*.py' 'pytest.mark.gpu' tests"


def test_gpu_check_selects_test_files_by_their_marker() -> None:
    assert SELECTION in (ROOT / "scripts" / "gpu-check").read_text()


def test_every_test_that_uses_the_gpu_marker_spells_it_as_the_selection_looks_for() -> None:
    marked = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        text = path.read_text()
        if re.search(r"\bmark\.gpu\b|marks?=[^\n]*\bgpu\b", text):
            assert "pytest.mark.gpu" in text, f"{path} marks GPU tests another way"
            marked.append(path.relative_to(ROOT).as_posix())
    assert (
        "tests/worker/training/test_reuse.py" in marked
        and "tests/worker/model/test_attention_cuda.py" in marked
    )
