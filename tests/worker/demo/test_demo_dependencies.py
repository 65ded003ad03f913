"""scripts/demo installs only the `demo` extra: everything the demo imports must be declared there."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def declared(extra: str, project: dict) -> set[str]:
    """Distribution names the extra pulls in directly, following the project's self-references."""
    names: set[str] = set()
    for requirement in [*project["dependencies"], *project["optional-dependencies"][extra]]:
        name = re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        if name == project["name"]:
            for inner in re.search(r"\[(.*)\]", requirement).group(1).split(","):  # type: ignore[union-attr]
                names |= declared(inner.strip(), project)
        else:
            names.add(name)
    return names


def imported_modules(folder: Path) -> set[str]:
    modules: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules.add(node.module.split(".")[0])
    return modules


def test_every_third_party_import_of_the_demo_is_in_the_demo_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    allowed = declared("demo", project)
    owners = packages_distributions()
    ours = {"alchemist_protocol", "alchemist_worker"}
    missing = {
        module: owners.get(module)
        for module in imported_modules(ROOT / "worker" / "alchemist_worker" / "demo")
        if module not in sys.stdlib_module_names and module not in ours and module != "__future__"
        if not {d.lower().replace("_", "-") for d in owners.get(module, [module])} & allowed
    }
    assert not missing, f"add the distributions of these imports to the demo extra: {missing}"
