"""Where a replica finds versions its own directory lacks, from `ALCHEMIST_VERSIONS_SOURCE` (the operator sets it
from `spec.versions.storage`):

- `local` (default): nowhere else; the directory is the job's one shared volume (or a single replica's);
- `peers`: the other replicas, over HTTP (`ALCHEMIST_VERSIONS_PEER_URL`, with `{replica}`); every replica
  serves the versions it holds;
- `s3`: the bucket at `ALCHEMIST_VERSIONS_S3_URI`; the trainer uploads each version before publishing it.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass

from alchemist_protocol.job_store import JobStore
from fastapi import APIRouter

from alchemist_worker.versions.directory import VersionDirectory
from alchemist_worker.versions.mirror import VersionMirror
from alchemist_worker.versions.peer_source import PeerSource, first_admin_key, version_files_router
from alchemist_worker.versions.publisher import Uploader
from alchemist_worker.versions.s3_versions import S3Versions


class SourceKind(enum.StrEnum):
    LOCAL = "local"
    PEERS = "peers"
    S3 = "s3"


@dataclass
class VersionStorage:
    directory: VersionDirectory
    mirror: VersionMirror | None = None
    uploader: Uploader | None = None
    router: APIRouter | None = None

    def available(self, version: int) -> bool:
        """Whether the version is here to load; with a mirror, asks for a copy when it is not."""
        if self.mirror is not None:
            return self.mirror.available(version)
        return version == 0 or version in self.directory.committed()


def _pruning(mirror: VersionMirror) -> VersionMirror:
    """Each copy also drops local copies of versions the trainer has since pruned, so a replica's disk stays bounded."""

    def prune_after_copy(version: int) -> None:
        mirror.prune({version})

    mirror.on_copied = prune_after_copy
    return mirror


def version_storage(
    directory: VersionDirectory, store: JobStore, replica: str, env: Mapping[str, str] | None = None
) -> VersionStorage:
    env = os.environ if env is None else env
    raw = env.get("ALCHEMIST_VERSIONS_SOURCE", "") or SourceKind.LOCAL.value
    try:
        kind = SourceKind(raw)
    except ValueError:
        raise ValueError(f"ALCHEMIST_VERSIONS_SOURCE={raw!r}: expected local, peers or s3") from None
    if kind is SourceKind.PEERS:
        template = env.get("ALCHEMIST_VERSIONS_PEER_URL", "")
        source = PeerSource(template, store, replica, token=first_admin_key(env))
        mirror = _pruning(VersionMirror(directory, store, source))
        return VersionStorage(directory, mirror, router=version_files_router(directory))
    if kind is SourceKind.S3:
        uri = env.get("ALCHEMIST_VERSIONS_S3_URI", "")
        if not uri:
            raise ValueError(
                "ALCHEMIST_VERSIONS_SOURCE=s3 needs ALCHEMIST_VERSIONS_S3_URI (s3://bucket/prefix)"
            )
        bucket = S3Versions(uri)
        return VersionStorage(directory, _pruning(VersionMirror(directory, store, bucket)), uploader=bucket)
    return VersionStorage(directory)
