"""The operator's fixtures (kmock with the CRD and a kubeconfig for it, an operator configuration) for the CLI."""

import pytest

from tests.operator.conftest import crd, kube, operator_config  # noqa: F401  (fixtures)


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """rich wraps to COLUMNS when not on a terminal: wide enough that no cell is cut in the assertions."""
    monkeypatch.setenv("COLUMNS", "250")


from tests.charts.conftest import helm, kubectl, render, tools  # noqa: E402, F401  (fixtures)
