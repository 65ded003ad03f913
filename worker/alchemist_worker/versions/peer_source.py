"""Versions served by the replicas that hold them, over the worker's own HTTP API (`PerReplica` storage).

    GET /v1/versions/{version}/files/{name}    a file of a committed version here: its manifest
                                               (`alchemist-version.json`) or a file the manifest lists

The route lives under `/v1/versions`, so the admin keys guard it when the job has any; a replica presents the
first admin key of its own set (the same Secret is mounted in every pod). A replica asks the one that trained
the version first (Redis names it), then every other live replica, since any replica that copied a version
serves it too: the versions outlive their publisher as long as one replica has them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import httpx
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.schemas import VersionInfo
from fastapi import APIRouter
from fastapi.responses import FileResponse

from alchemist_worker.api.auth import parse_keys
from alchemist_worker.api.errors import APIError
from alchemist_worker.versions.directory import MANIFEST, VersionDirectory, VersionManifest
from alchemist_worker.versions.mirror import VersionUnavailable

CHUNK = 2**20


def version_files_router(directory: VersionDirectory) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/versions/{version}/files/{name}", include_in_schema=False)
    def version_file(version: int, name: str) -> FileResponse:
        path = directory.path(version) if version >= 1 else None
        if path is None or not (path / MANIFEST).is_file():
            raise APIError(
                404, f"version {version} is not held by this replica", param="version", code="not_found"
            )
        listed = {MANIFEST, *directory.manifest(version).files}
        if name not in listed or not (path / name).is_file():
            raise APIError(
                404, f"version {version} has no file {name!r} here", param="name", code="not_found"
            )
        return FileResponse(path / name, media_type="application/octet-stream")

    return router


def first_admin_key(env: Mapping[str, str] | None = None) -> str | None:
    """The key this replica presents to the others: the first of its admin set (file or variable)."""
    env = os.environ if env is None else env
    file = env.get("ALCHEMIST_ADMIN_KEYS_FILE", "")
    text = Path(file).read_text() if file else env.get("ALCHEMIST_ADMIN_KEYS", "")
    keys = parse_keys(text)
    return keys[0] if keys else None


class PeerSource:
    def __init__(
        self,
        url_template: str,  # e.g. "http://{replica}.chat-headless.team-a.svc:8000"
        store: JobStore,
        replica: str,
        token: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        if "{replica}" not in url_template:
            raise ValueError(f"ALCHEMIST_VERSIONS_PEER_URL must contain {{replica}}, got {url_template!r}")
        self.url_template = url_template
        self.store = store
        self.replica = replica
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(headers=headers, timeout=timeout_s)

    def peers_for(self, info: VersionInfo) -> list[str]:
        """Who to ask, in order: the replica that trained it, then the other live replicas."""
        others = [r.replica for r in self.store.live_replicas()]
        ordered = [info.trained_by, *others] if info.trained_by else others
        return [p for p in dict.fromkeys(ordered) if p and p != self.replica]

    def fetch(self, info: VersionInfo, into: Path) -> None:
        answers = []
        for peer in self.peers_for(info):
            try:
                self._fetch_from(peer, info.version, into)
                return
            except (httpx.HTTPError, OSError, ValueError) as exc:
                answers.append(f"{peer}: {exc}")
                for leftover in into.iterdir():
                    leftover.unlink()
        raise VersionUnavailable(
            f"no replica could provide version {info.version}: "
            + ("; ".join(answers) or "no other replica is live")
        )

    def _fetch_from(self, peer: str, version: int, into: Path) -> None:
        base = self.url_template.format(replica=peer).rstrip("/")
        manifest_bytes = self._get(f"{base}/v1/versions/{version}/files/{MANIFEST}", into / f".{MANIFEST}")
        manifest = VersionManifest.model_validate_json(manifest_bytes.read_bytes())
        if manifest.info.version != version:
            raise ValueError(f"{peer} answered with version {manifest.info.version}'s manifest")
        for name in manifest.files:
            if "/" in name or name.startswith("."):
                raise ValueError(f"{peer}'s manifest lists an odd file name {name!r}")
            self._get(f"{base}/v1/versions/{version}/files/{name}", into / name)
        manifest_bytes.rename(into / MANIFEST)  # last: the copy is checked against it before it is committed

    def _get(self, url: str, dest: Path) -> Path:
        with self.client.stream("GET", url) as response:
            response.raise_for_status()
            expected = response.headers.get("content-length")
            written = 0
            with dest.open("wb") as out:
                for chunk in response.iter_bytes(CHUNK):
                    out.write(chunk)
                    written += len(chunk)
        if expected is not None and int(expected) != written:
            raise OSError(f"{url}: got {written} bytes, expected {expected}")
        return dest

    def close(self) -> None:
        self.client.close()
