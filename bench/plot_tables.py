"""PNG plots of the benchmark result tables committed in docs/, written beside the Markdown file that holds them.

    python bench/plot_tables.py                 # every table under docs/
    python bench/plot_tables.py docs/serving_benchmark.md --link

Each Markdown table becomes `<file>-table<N>.png`: one small bar chart per measured quantity, so quantities in
different units never share an axis. A table whose first header cell is empty has one quantity per row (the
co-location tables: rows are metrics, columns the setups compared); any other has one per column (rows are the
setups). Relative columns (percentages, "vs", "ratio", "target") are left out: they are read off the absolute
bars. `--link` puts `![...](<png>)` under each plotted table once, so the plot shows beside it.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DOCS = Path(__file__).resolve().parents[1] / "docs"
NUMBER = re.compile(r"^[~≈]?\s*([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)\s*(x|%|[a-zA-Z/ ()]*)?(?:\s*\(.*\))?$")
RELATIVE = ("vs", "ratio", "target", "compared", "share", "speedup", "achieved", "ideal")


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]
    end_line: int  # index of the table's last line in the file


def parse_tables(text: str) -> list[Table]:
    """Markdown pipe tables: a header line, a |---| line, and the rows under them."""
    lines = text.splitlines()
    tables = []
    i = 0
    while i < len(lines) - 1:
        if lines[i].startswith("|") and re.match(r"^\|\s*:?-{3,}", lines[i + 1]):
            header = _cells(lines[i])
            rows = []
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                rows.append(_cells(lines[j]))
                j += 1
            tables.append(Table(header, rows, j - 1))
            i = j
        else:
            i += 1
    return tables


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def number(cell: str) -> float | None:
    """The measured value in a cell ("832.2", "56 (est.)", "72.2 (training alone)"); None for text and for
    relative values (percentages, ratios)."""
    match = NUMBER.match(cell.replace(",", ""))
    if match is None or match.group(2) in ("x", "%"):
        return None
    return float(match.group(1))


def series(table: Table) -> list[tuple[str, list[tuple[str, float]]]]:
    """(quantity, [(label, value)]) for each plottable quantity of the table."""
    header, rows = table.header, [r + [""] * (len(table.header) - len(r)) for r in table.rows]
    if not header[0]:  # rows are quantities, columns the setups compared
        columns = [k for k in range(1, len(header)) if not _relative(header[k])]
        out = []
        for row in rows:
            if _relative(row[0]):
                continue
            points = [(header[k], v) for k in columns if (v := number(row[k])) is not None]
            if len(points) >= 2:
                out.append((row[0], points))
        return out
    numeric = [
        k
        for k in range(1, len(header))
        if not _relative(header[k]) and sum(number(r[k]) is not None for r in rows) >= max(2, len(rows) // 2)
    ]
    label_columns = [
        k
        for k in range(len(header))
        if k not in numeric and not _relative(header[k]) and not any(NUMBER.match(r[k]) for r in rows)
    ]
    out = []
    for k in numeric:
        points = []
        for row in rows:
            value = number(row[k])
            if value is not None:
                points.append((" ".join(row[c] for c in label_columns if row[c]) or row[0], value))
        if any(value for _, value in points):  # a column of zeros (failed requests: 0) says it in the table
            out.append((header[k], points))
    return out


def _relative(name: str) -> bool:
    lowered = name.lower()
    return any(re.search(rf"\b{word}\b", lowered) for word in RELATIVE)


def plot(table: Table, title: str, path: Path) -> bool:
    """Writes the table's PNG; False when it has nothing to plot."""
    quantities = series(table)
    if not quantities:
        return False
    columns = min(3, len(quantities))
    rows = math.ceil(len(quantities) / columns)
    longest = max(len(points) for _, points in quantities)
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns, 0.9 + 0.32 * longest * rows + 0.6 * rows), squeeze=False
    )
    for ax, (name, points) in zip(axes.flat, quantities, strict=False):
        labels = [label[:48] for label, _ in points]
        values = [value for _, value in points]
        ax.barh(range(len(values)), values, color="#4c72b0")
        ax.set_yticks(range(len(values)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:g}", va="center", fontsize=6)
        ax.margins(x=0.25)
    for ax in list(axes.flat)[len(quantities) :]:
        ax.axis("off")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True


def link_plots(markdown: Path, plotted: dict[int, Path]) -> None:
    """Puts an image link under each plotted table, unless the file already has it."""
    lines = markdown.read_text().splitlines()
    for end_line, png in sorted(plotted.items(), reverse=True):
        link = f"![Plot of the table above]({png.name})"
        if link not in lines:
            lines[end_line + 1 : end_line + 1] = ["", link]
    markdown.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help="Markdown files (default: every one under docs/)")
    parser.add_argument("--link", action="store_true", help="put an image link under each plotted table")
    args = parser.parse_args()
    files = args.files or sorted(DOCS.rglob("*.md"))
    for markdown in files:
        plotted = {}
        for n, table in enumerate(parse_tables(markdown.read_text()), start=1):
            png = markdown.with_name(f"{markdown.stem}-table{n}.png")
            if plot(table, f"{markdown.stem}, table {n}", png):
                plotted[table.end_line] = png
                print(png)
        if args.link and plotted:
            link_plots(markdown, plotted)


if __name__ == "__main__":
    main()
