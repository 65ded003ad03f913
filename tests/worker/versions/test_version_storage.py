"""Versions held elsewhere: copied from the replica that published them (over real HTTP) or from a bucket (a moto
S3 server), into a replica's own directory, with real Redis as the lineage's commit point."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import JobKeys
from alchemist_protocol.schemas import ArtifactKind, ReplicaState
from alchemist_worker.api.auth import AccessKeys, BearerAuth
from alchemist_worker.api.errors import install_error_handlers
from alchemist_worker.object_store import S3Location, list_objects
from alchemist_worker.versions.directory import MANIFEST, VersionDirectory, VersionNotHere
from alchemist_worker.versions.mirror import VersionMirror, VersionUnavailable
from alchemist_worker.versions.peer_source import PeerSource, first_admin_key, version_files_router
from alchemist_worker.versions.publisher import CommitIOError, VersionDraft, VersionPublisher
from alchemist_worker.versions.s3_versions import S3Versions
from alchemist_worker.versions.storage import version_storage
from fastapi import FastAPI

from tests.fixtures.http_server import free_port, serve_in_thread

KEYS = JobKeys("ns", "job")
WEIGHTS = bytes(range(256)) * 4096  # 1 MiB: several chunks on the wire


def draft(version: int) -> VersionDraft:
    def write(path: Path) -> None:
        (path / "adapter_model.safetensors").write_bytes(WEIGHTS + bytes([version]))
        (path / "adapter_config.json").write_text('{"r": 4}')

    return VersionDraft(
        version=version, parent=version - 1, kind=ArtifactKind.LORA, write_files=write, feedback=[]
    )


def files_of(directory: VersionDirectory, version: int) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.path(version).iterdir()}


def _serve(directory: VersionDirectory, keys: AccessKeys | None = None) -> tuple[str, Callable[[], None]]:
    """The worker's file route (behind its bearer-key middleware when `keys`) on a real HTTP server: (its name,
    stop). The name is its host:port, so the URL template `http://{replica}` reaches it."""
    app = FastAPI()
    install_error_handlers(app)  # as the worker's server does
    app.include_router(version_files_router(directory))
    if keys is not None:
        app.add_middleware(BearerAuth, keys=keys)
    port = free_port()
    stop = serve_in_thread(app, port)
    return f"127.0.0.1:{port}", stop


@pytest.fixture
def replica_server(tmp_path: Path) -> Iterator[tuple[str, VersionDirectory]]:
    """A replica's versions directory served over HTTP: (its name, directory)."""
    directory = VersionDirectory(tmp_path / "publisher")
    name, stop = _serve(directory)
    yield name, directory
    stop()


def test_a_replica_copies_a_version_from_the_one_that_published_it(
    redis_client: redis.Redis, replica_server: tuple[str, VersionDirectory], tmp_path: Path
) -> None:
    publisher_name, published = replica_server
    store = JobStore(redis_client, KEYS)
    VersionPublisher(published, store, publisher_name, keep=3).commit(draft(1))
    mine = VersionDirectory(tmp_path / "follower")
    mirror = VersionMirror(mine, store, PeerSource("http://{replica}", store, "r1"))

    assert mirror.copy(1) == mine.path(1)
    assert files_of(mine, 1) == files_of(published, 1)
    assert mine.committed() == [1]
    assert not [p for p in mine.root.iterdir() if p.name.startswith(".")]  # no staging left behind
    with pytest.raises(VersionUnavailable, match="not published"):
        mirror.copy(2)


def test_the_trainer_restores_a_version_it_lacks_through_the_background_copy(
    redis_client: redis.Redis, replica_server: tuple[str, VersionDirectory], tmp_path: Path
) -> None:
    publisher_name, published = replica_server
    store = JobStore(redis_client, KEYS)
    VersionPublisher(published, store, publisher_name, keep=3).commit(draft(1))
    env = {"ALCHEMIST_VERSIONS_SOURCE": "peers", "ALCHEMIST_VERSIONS_PEER_URL": "http://{replica}"}
    mine = VersionDirectory(tmp_path / "new-trainer")
    storage = version_storage(mine, store, "r1", env)
    with pytest.raises(VersionNotHere, match="a copy has been requested"):
        mine.require(1)  # what the control thread's restore meets: it retries at its next lease tick
    deadline = time.monotonic() + 20
    while not storage.available(1):
        assert time.monotonic() < deadline, storage.mirror.last_error if storage.mirror else ""
        time.sleep(0.05)
    assert mine.require(1) == mine.path(1)
    assert files_of(mine, 1) == files_of(published, 1)


def test_any_live_replica_that_holds_the_version_serves_it_when_the_publisher_is_gone(
    redis_client: redis.Redis, replica_server: tuple[str, VersionDirectory], tmp_path: Path
) -> None:
    holder_name, holder = replica_server
    store = JobStore(redis_client, KEYS)
    gone = f"127.0.0.1:{free_port()}"  # nothing listens there
    VersionPublisher(VersionDirectory(tmp_path / "gone"), store, gone, keep=3).commit(draft(1))
    # The holder copied it earlier (here: straight from the publisher's files) and beats its heartbeat.
    VersionMirror(holder, store, _DirectorySource(tmp_path / "gone")).copy(1)
    store.report_replica(ReplicaState(replica=holder_name, loaded_version=1, ready=True), ttl_seconds=30)
    mine = VersionDirectory(tmp_path / "follower")
    source = PeerSource("http://{replica}", store, "r2", timeout_s=5)
    assert source.peers_for(store.get_version(1)) == [gone, holder_name]  # type: ignore[arg-type]
    VersionMirror(mine, store, source).copy(1)
    assert files_of(mine, 1) == files_of(holder, 1)

    store.report_replica(ReplicaState(replica=holder_name, loaded_version=1, ready=True), ttl_seconds=30)
    (
        holder.path(1) / "adapter_model.safetensors"
    ).unlink()  # the holder lost a file: the copy must fail whole
    other = VersionDirectory(tmp_path / "other")
    with pytest.raises(VersionUnavailable, match=f"{holder_name}: .*404"):
        VersionMirror(other, store, source).copy(1)
    assert other.committed() == [] and not list(other.root.iterdir())


class _DirectorySource:
    """Copies from another directory on this machine (stands in for a replica's earlier copy)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def fetch(self, info: Any, into: Path) -> None:
        for path in (self.root / f"v{info.version:06d}").iterdir():
            (into / path.name).write_bytes(path.read_bytes())


def test_the_route_serves_only_committed_versions_and_their_listed_files(
    redis_client: redis.Redis, replica_server: tuple[str, VersionDirectory]
) -> None:
    import httpx

    name, published = replica_server
    VersionPublisher(published, JobStore(redis_client, KEYS), name, keep=3).commit(draft(1))
    (published.root / ".staging-v000002-x").mkdir()
    with httpx.Client(base_url=f"http://{name}") as client:
        assert client.get(f"/v1/versions/1/files/{MANIFEST}").status_code == 200
        assert client.get("/v1/versions/1/files/adapter_config.json").text == '{"r": 4}'
        assert client.get("/v1/versions/2/files/adapter_config.json").status_code == 404
        assert client.get("/v1/versions/1/files/..%2F..%2Fetc%2Fpasswd").status_code == 404
        assert client.get("/v1/versions/0/files/config.json").status_code == 404


def test_reconcile_keeps_published_versions_this_replica_does_not_hold(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    store = JobStore(redis_client, KEYS)
    VersionPublisher(VersionDirectory(tmp_path / "old-trainer"), store, "r0", keep=3).commit(draft(1))
    mine = VersionDirectory(tmp_path / "new-trainer")
    VersionMirror(mine, store, _DirectorySource(tmp_path / "old-trainer"))  # a source elsewhere
    VersionPublisher(mine, store, "r1", keep=3).reconcile()
    assert store.version_numbers() == [1]
    alone = VersionDirectory(tmp_path / "alone")  # without one, a version missing from the disk is forgotten
    VersionPublisher(alone, store, "r1", keep=3).reconcile()
    assert store.version_numbers() == []


def test_s3_versions_are_uploaded_before_they_are_published_and_copied_from_the_bucket(
    redis_client: redis.Redis, s3_bucket: tuple[Any, str], tmp_path: Path
) -> None:
    client, bucket = s3_bucket
    store = JobStore(redis_client, KEYS)
    uploader = S3Versions(f"s3://{bucket}/jobs/chat", client)
    trainer_dir = VersionDirectory(tmp_path / "trainer")
    pub = VersionPublisher(trainer_dir, store, "r0", keep=2, uploader=uploader)
    mirror = VersionMirror(
        trainer_dir, store, uploader
    )  # the trainer's storage, as version_storage builds it
    assert mirror.directory is trainer_dir
    drafts = [draft(v) for v in (1, 2, 3)]
    for d in drafts:
        pub.commit(d)
    info = store.get_version(3)
    assert info is not None and info.path == f"s3://{bucket}/jobs/chat/v000003-{drafts[2].writer}"

    follower = VersionDirectory(tmp_path / "follower")
    VersionMirror(follower, store, S3Versions(f"s3://{bucket}/jobs/chat", client)).copy(3)
    assert files_of(follower, 3) == files_of(trainer_dir, 3)

    assert pub.prune() == [1]  # beyond the newest 2: gone from the disk, Redis and the bucket
    assert store.version_numbers() == [2, 3]
    objects = list_objects(client, S3Location.parse(f"s3://{bucket}/jobs/chat"))
    remaining = {o.relative.split("/")[0] for o in objects}
    assert remaining == {f"v000002-{drafts[1].writer}", f"v000003-{drafts[2].writer}"}


def test_a_failed_upload_publishes_nothing_and_is_retried_unchanged(
    redis_client: redis.Redis, s3_bucket: tuple[Any, str], tmp_path: Path
) -> None:
    client, bucket = s3_bucket
    store = JobStore(redis_client, KEYS)
    directory = VersionDirectory(tmp_path / "trainer")
    pending = draft(1)
    broken = VersionPublisher(
        directory, store, "r0", keep=2, uploader=S3Versions("s3://no-such-bucket/v", client)
    )
    with pytest.raises(CommitIOError, match="uploading version 1"):
        broken.commit(pending)
    assert store.version_numbers() == []
    working = VersionPublisher(
        directory, store, "r0", keep=2, uploader=S3Versions(f"s3://{bucket}/v", client)
    )
    info = working.commit(pending)  # the retry reuses its own directory and uploads it
    assert info.path == f"s3://{bucket}/v/v000001-{pending.writer}"
    assert store.version_numbers() == [1]


def test_with_admin_keys_a_replica_presents_the_first_one_and_nothing_else_gets_the_files(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    keys_file = tmp_path / "admin-keys"
    keys_file.write_text("# the Secret mounted in every pod\nadmin-one\nadmin-two\n")
    env = {"ALCHEMIST_ADMIN_KEYS_FILE": str(keys_file), "ALCHEMIST_API_KEYS": "api-key"}
    published = VersionDirectory(tmp_path / "publisher")
    name, stop = _serve(published, AccessKeys.from_env(env))
    try:
        store = JobStore(redis_client, KEYS)
        VersionPublisher(published, store, name, keep=3).commit(draft(1))
        assert first_admin_key(env) == "admin-one"
        with pytest.raises(VersionUnavailable, match="401"):
            VersionMirror(
                VersionDirectory(tmp_path / "a"), store, PeerSource("http://{replica}", store, "r1")
            ).copy(1)
        with_api_key = PeerSource("http://{replica}", store, "r1", token="api-key")
        with pytest.raises(VersionUnavailable, match="401"):
            VersionMirror(VersionDirectory(tmp_path / "b"), store, with_api_key).copy(1)
        mine = VersionDirectory(tmp_path / "c")
        VersionMirror(
            mine, store, PeerSource("http://{replica}", store, "r1", token=first_admin_key(env))
        ).copy(1)
        assert files_of(mine, 1) == files_of(published, 1)
    finally:
        stop()
