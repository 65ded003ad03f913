"""bench/plot_tables.py: what it reads out of a results table, and that it writes a PNG and links it once."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "plot_tables.py"
    spec = importlib.util.spec_from_file_location("plot_tables", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["plot_tables"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


SETUPS_IN_ROWS = """# Results

| policy | prefill step (ms) | vs off | decode step (ms) | failed |
|---|---|---|---|---|
| off | 832.2 | +0.0% | 119.6 | 0 |
| kv | 865.4 | +4.0% | 108.3 | 0 |
text after
"""
QUANTITIES_IN_ROWS = """| | serving alone | co-located | ratio |
|---|---|---|---|
| p99 TTFT (ms) | 645.8 | 552.2 | 0.86x |
| training tokens/s | 72.2 (training alone) | 50.8 | 0.70x |
"""


def test_series_take_absolute_columns_and_leave_relative_ones_out() -> None:
    plot_tables = load()
    (table,) = plot_tables.parse_tables(SETUPS_IN_ROWS)
    assert plot_tables.series(table) == [
        ("prefill step (ms)", [("off", 832.2), ("kv", 865.4)]),
        ("decode step (ms)", [("off", 119.6), ("kv", 108.3)]),
    ]
    (table,) = plot_tables.parse_tables(QUANTITIES_IN_ROWS)
    assert plot_tables.series(table) == [
        ("p99 TTFT (ms)", [("serving alone", 645.8), ("co-located", 552.2)]),
        ("training tokens/s", [("serving alone", 72.2), ("co-located", 50.8)]),
    ]


def test_png_written_and_linked_once(tmp_path: Path) -> None:
    plot_tables = load()
    markdown = tmp_path / "results.md"
    markdown.write_text(SETUPS_IN_ROWS)
    (table,) = plot_tables.parse_tables(markdown.read_text())
    png = tmp_path / "results-table1.png"
    assert plot_tables.plot(table, "results", png)
    assert png.read_bytes().startswith(PNG_MAGIC)
    for _ in range(2):
        plot_tables.link_plots(markdown, {table.end_line: png})
    text = markdown.read_text()
    assert text.count("![Plot of the table above](results-table1.png)") == 1
    assert text.index("| kv |") < text.index("![Plot") < text.index("text after")
