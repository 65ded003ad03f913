"""Copies published versions a replica lacks into its own versions directory, from other replicas or a bucket.

With a directory per replica (`PerReplica` storage) or a bucket (`S3`), a version that Redis lists may be absent
here: the follower wants to serve it, or this replica took over training from it. The mirror copies it into a
staging directory and renames it into place once complete (directory.py's `commit_copy`), so a version is
complete or absent here too. Redis stays the lineage's commit point: only versions it lists are copied, and
the copy comes from the metadata it holds (who trained it; the bucket path it was uploaded to).

Copies run on a background thread, one version at a time, so a large version never holds up the control
thread's heartbeat and lease; callers ask again until the version is here (`available`, `require`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from alchemist_protocol.job_store import JobStore
from alchemist_protocol.schemas import VersionInfo

from alchemist_worker.versions.directory import VersionDirectory, VersionExists

log = logging.getLogger(__name__)


class VersionUnavailable(RuntimeError):
    """No source could provide the version right now; the message says what each one answered."""


class VersionSource(Protocol):
    def fetch(self, info: VersionInfo, into: Path) -> None:
        """Writes the version's files and its manifest into `into`, an empty staging directory."""
        ...


class VersionMirror:
    def __init__(
        self,
        directory: VersionDirectory,
        store: JobStore,
        source: VersionSource,
        on_copied: Callable[[int], None] = lambda version: None,
    ) -> None:
        self.directory = directory
        self.store = store
        self.source = source
        self.on_copied = on_copied
        self.last_error: str = ""
        self._lock = threading.Lock()
        self._running: int | None = None
        directory.fetch_missing = self.request

    def available(self, version: int) -> bool:
        """True when the version is here (0, the base model, always is); otherwise asks for a copy."""
        if version == 0 or version in self.directory.committed():
            return True
        self.request(version)
        return False

    def request(self, version: int) -> None:
        """Starts copying `version` unless a copy is running already (the next request starts it then)."""
        with self._lock:
            if self._running is not None:
                return
            self._running = version
        threading.Thread(target=self._copy_in_background, args=(version,), daemon=True).start()

    def _copy_in_background(self, version: int) -> None:
        try:
            self.copy(version)
        except Exception as exc:  # reported, and tried again at the next request
            self.last_error = f"version {version}: {exc}"
            log.warning("cannot copy version %d yet: %s", version, exc)
        finally:
            with self._lock:
                self._running = None

    def copy(self, version: int) -> Path:
        """Copies the version now; returns its directory. Raises VersionUnavailable or the source's error."""
        path = self.directory.path(version)
        if version in self.directory.committed():
            return path
        info = self.store.get_version(version)
        if info is None:
            raise VersionUnavailable(f"version {version} is not published (Redis does not list it)")
        staged = self.directory.stage(version)
        try:
            self.source.fetch(info, staged.path)
        except BaseException:
            self.directory.discard(staged)
            raise
        try:
            self.directory.commit_copy(staged)
        except VersionExists:
            return path  # copied (or written) here meanwhile: the same published version
        log.info("copied version %d into %s", version, path)
        self.last_error = ""
        self.on_copied(version)
        return path

    def prune(self, keep: set[int]) -> list[int]:
        """Deletes local copies older than every version Redis lists (the trainer pruned those), except those in
        `keep` (what this replica serves). An empty list (Redis lost its data) deletes nothing."""
        listed = self.store.version_numbers()
        if not listed:
            return []
        doomed = [v for v in self.directory.committed() if v < min(listed) and v not in keep]
        for version in doomed:
            self.directory.delete(version)
        return doomed
