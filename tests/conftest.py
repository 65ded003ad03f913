pytest_plugins = [
    "tests.fixtures.redis_server",
    "tests.fixtures.checkpoints",
    "tests.fixtures.s3_server",
]


def pytest_collection_modifyitems(config, items) -> None:  # type: ignore[no-untyped-def]
    """Tests marked `gpu` need a CUDA device; elsewhere they are reported as skipped, with the reason."""
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run scripts/gpu-check on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
