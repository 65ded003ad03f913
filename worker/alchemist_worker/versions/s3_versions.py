"""Versions in an S3-compatible bucket (`S3` storage): uploaded before they are published, copied by any replica.

Each commit attempt uploads under its own prefix, `<uri>/v000007-<writer>/`, files first and the manifest last,
and the Redis record it publishes names that prefix as the version's `path`. Two writers racing for one version
number (a fenced-out trainer and its successor) therefore never mix their files, and a replica copies exactly
the files of the version Redis lists. An upload that fails is an OSError to the publisher (retried later, like a
full disk), never a published version without files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alchemist_protocol.schemas import VersionInfo

from alchemist_worker.object_store import (
    S3Location,
    delete_prefix,
    download,
    get_bytes,
    list_objects,
    put_bytes,
    s3_client,
    upload_file,
)
from alchemist_worker.versions.directory import MANIFEST, VersionManifest, version_dirname
from alchemist_worker.versions.mirror import VersionUnavailable


class S3Versions:
    def __init__(self, uri: str, client: Any | None = None) -> None:
        self.root = S3Location.parse(uri)
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client()
        return self._client

    def location(self, version: int, writer: str) -> S3Location:
        return self.root.child(f"{version_dirname(version)}-{writer or 'unknown'}")

    def upload(self, path: Path, manifest: VersionManifest) -> VersionInfo:
        """Uploads the committed directory `path`; returns the version's metadata with the bucket as its path."""
        location = self.location(manifest.info.version, manifest.writer)
        try:
            for name in manifest.files:
                upload_file(self.client, location, name, path / name)
            put_bytes(self.client, location, MANIFEST, (path / MANIFEST).read_bytes())
        except OSError:
            raise
        except Exception as exc:  # botocore's errors: the publisher retries an OSError later, unchanged
            raise OSError(f"uploading version {manifest.info.version} to {location}: {exc}") from exc
        return manifest.info.model_copy(update={"path": str(location)})

    def fetch(self, info: VersionInfo, into: Path) -> None:
        if not info.path.startswith("s3://"):
            raise VersionUnavailable(f"version {info.version} was published at {info.path}, not in a bucket")
        location = S3Location.parse(info.path)
        raw = get_bytes(self.client, location, MANIFEST)
        if raw is None:
            raise VersionUnavailable(f"version {info.version} has no manifest at {location}")
        manifest = VersionManifest.model_validate_json(raw)
        objects = {o.relative: o for o in list_objects(self.client, location)}
        for name in manifest.files:
            if name not in objects:
                raise VersionUnavailable(f"version {info.version} lacks {name} at {location}")
            download(self.client, location, objects[name], into / name)
        (into / MANIFEST).write_bytes(raw)

    def delete(self, info: VersionInfo) -> None:
        if info.path.startswith("s3://"):
            delete_prefix(self.client, S3Location.parse(info.path))
