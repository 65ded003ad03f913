"""Two replicas with a versions directory each (no shared volume): the one that does not train serves what the
trainer publishes, copied over HTTP from the trainer (`peers`, the operator's default) or from a bucket (`s3`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from alchemist_worker.api.errors import install_error_handlers
from fastapi import FastAPI

from tests.fixtures.http_server import free_port, serve_in_thread
from tests.worker.continual.conftest import InProcessWorker, wait_until

PROMPT = [5, 17, 42, 8, 99, 23]


@pytest.fixture
def servers() -> Iterator[list[Callable[[], None]]]:
    stops: list[Callable[[], None]] = []
    yield stops
    for stop in stops:
        stop()


@pytest.mark.slow
@pytest.mark.parametrize("source", ["peers", "s3"])
def test_a_replica_without_a_shared_volume_serves_the_trainers_versions(
    source: str,
    make_worker: Callable[..., InProcessWorker],
    servers: list[Callable[[], None]],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("ALCHEMIST_VERSIONS_SOURCE", source)
    if source == "peers":
        monkeypatch.setenv("ALCHEMIST_VERSIONS_PEER_URL", "http://{replica}")
    else:
        _, bucket = request.getfixturevalue("s3_bucket")  # a moto S3 server, boto3's variables set
        monkeypatch.setenv("ALCHEMIST_VERSIONS_S3_URI", f"s3://{bucket}/versions")
    port = free_port()
    trainer = make_worker(replica=f"127.0.0.1:{port}", versions=tmp_path / "trainer-versions")
    app = FastAPI()
    install_error_handlers(app)
    for router in trainer.runtime.routers():
        app.include_router(router)
    servers.append(serve_in_thread(app, port))
    wait_until(lambda: trainer.runtime.control.training, 10, "the first replica takes the lease")

    follower = make_worker(replica="r1", versions=tmp_path / "follower-versions")
    out = follower.generate(PROMPT)
    follower.feedback.accept(out.request_id)
    trainer.wait_version(1)
    follower.wait_serving(1)
    copied = follower.runtime.directory
    assert copied.committed() == [1]
    theirs: Any = trainer.runtime.directory.path(1)
    assert {p.name: p.read_bytes() for p in copied.path(1).iterdir()} == {
        p.name: p.read_bytes() for p in theirs.iterdir()
    }
    info = follower.store.get_version(1)
    assert info is not None
    assert info.path.startswith("s3://") if source == "s3" else info.path == str(theirs)
