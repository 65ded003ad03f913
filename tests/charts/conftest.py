"""Chart fixtures: the real helm binary (cached under .cache/tools), rendering, and the CRDs as parsed YAML."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.charts.helm_tool import ensure_binaries, kubectl_path

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "alchemist"
CRDS = REPO / "crds"
EXAMPLES = REPO / "examples"

Render = Callable[..., list[dict[str, Any]]]


@pytest.fixture(scope="session")
def tools() -> Path:
    try:
        return ensure_binaries(REPO / ".cache" / "tools")
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def helm(tools: Path) -> Path:
    return tools / "helm"


@pytest.fixture(scope="session")
def kubectl(tools: Path) -> Path:
    return kubectl_path(tools)


def run(
    *args: str | Path, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], input=stdin, capture_output=True, text=True, timeout=timeout
    )


def load_all(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="session")
def crd_docs() -> list[dict[str, Any]]:
    return [doc for path in sorted(CRDS.glob("*.yaml")) for doc in load_all(path.read_text())]


@pytest.fixture(scope="session")
def render(helm: Path, tmp_path_factory: pytest.TempPathFactory) -> Render:
    """`helm template` of the chart with the given values (and `--include-crds`); the parsed documents."""
    folder = tmp_path_factory.mktemp("values")

    def rendered(
        values: dict[str, Any] | None = None, namespace: str = "alchemist", release: str = "alc"
    ) -> list[dict[str, Any]]:
        args: list[str | Path] = [
            helm,
            "template",
            release,
            CHART,
            "--namespace",
            namespace,
            "--include-crds",
        ]
        if values is not None:
            path = folder / f"values-{abs(hash(yaml.safe_dump(values)))}.yaml"
            path.write_text(yaml.safe_dump(values))
            args += ["--values", path]
        result = run(*args)
        if result.returncode != 0:
            raise AssertionError(f"helm template failed:\n{result.stderr}")
        return load_all(result.stdout)

    return rendered
