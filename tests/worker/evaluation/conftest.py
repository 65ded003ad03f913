"""The continual trainer's in-process worker, for the gate's runtime tests."""

from tests.worker.continual.conftest import make_worker

__all__ = ["make_worker"]
