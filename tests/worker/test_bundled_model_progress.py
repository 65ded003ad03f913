"""The stages of the bundled model's first conversion, as a bar on a terminal and as lines elsewhere."""

from __future__ import annotations

import io

import pytest
from alchemist_worker import bundled_model
from rich.console import Console


def test_lines_when_not_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    with bundled_model._stages(show=False) as stage:
        stage("downloading")
        stage("saving")
    assert capsys.readouterr().err.splitlines() == [
        "SmolLM2-135M-Instruct: downloading",
        "SmolLM2-135M-Instruct: saving",
    ]


def test_a_bar_over_the_stages_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    monkeypatch.setattr("rich.progress.get_console", lambda: console)
    with bundled_model._stages(show=True) as stage:
        for text in ("downloading", "dequantizing", "copying", "saving"):
            stage(text)
    shown = screen.getvalue()
    assert "SmolLM2-135M-Instruct: saving" in shown
    assert "SmolLM2-135M-Instruct: converted" in shown and "4/4" in shown
