"""The versions directory: one sub-directory per committed version, never a half-written one.

Layout (a volume shared by the job's pods in Kubernetes):

    versions/
      v000001/                      a committed version: artifact files, then the manifest
        adapter_config.json         (LoRA, PEFT layout)   or config.json + model.safetensors (full)
        adapter_model.safetensors
        trainer_state.pt            optimizer and schedule, so training resumes exactly
        alchemist-version.json      the manifest: written last, its presence marks a complete version
      .staging-v000002-host-pid-x/  being written; renamed into place in one step when complete
      .trash-v000001-x/             being deleted; renamed out of the way first

Publishing writes everything into a staging directory, fsyncs each file and the directory, and renames it to
its final name; then fsyncs the parent so the rename itself survives a power cut. A rename onto an existing
version fails (VersionExists). Deleting renames first, so a version is either complete or absent at every
instant, whatever kills the process. Imports no torch.

A version directory is durable, not yet part of the lineage: the fenced commit in Redis decides that (see
publisher.py). Its manifest names its `writer` (one id per commit attempt chain), so a retry recognises its own
directory and re-commits it instead of writing a sibling.

Errors keep their class: a rename refused because the name is taken is VersionExists; anything else (EACCES,
ENOSPC, EROFS, EIO) is raised as the OSError it is, after the staging directory is removed. A staging directory
that cannot be removed at once (its parent turned unwritable) is removed at the next `stage()`.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from alchemist_protocol.schemas import VersionInfo
from pydantic import BaseModel, ConfigDict, Field

MANIFEST = "alchemist-version.json"
_NAME = re.compile(r"^v(\d{6,})$")
_STAGING = ".staging-"
_TRASH = ".trash-"


class VersionExists(RuntimeError):
    """Another writer committed this version number first."""


class VersionNotHere(FileNotFoundError):
    """A version this directory does not hold (yet): with a source elsewhere, a copy has been asked for."""


class TrainedFeedback(BaseModel):
    """One feedback sample a version was trained on: enough to acknowledge it again after a crash."""

    model_config = ConfigDict(extra="forbid")

    feedback_id: str
    entry_ids: list[str]
    label: str
    served_version: int | None = None


class VersionManifest(BaseModel):
    """What the directory knows about a version: its Redis metadata and the feedback it consumed."""

    model_config = ConfigDict(extra="forbid")

    info: VersionInfo
    feedback: list[TrainedFeedback] = Field(default_factory=list)
    files: list[str] = Field(default_factory=list)
    writer: str = ""  # the commit that wrote it (a retry re-commits its own directory); fencing token inside


def version_dirname(version: int) -> str:
    if version < 1:
        raise ValueError(f"versions start at 1 (0 is the base model), got {version}")
    return f"v{version:06d}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StagedVersion:
    """A version being written. Write artifact files into `path`, then `VersionDirectory.commit(staged, ...)`."""

    def __init__(self, version: int, path: Path) -> None:
        self.version = version
        self.path = path


class VersionDirectory:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._host = socket.gethostname().replace("-", "_")
        self._undeleted: set[Path] = set()  # staging directories a failed publish could not remove yet
        # Asks for a copy of a version held elsewhere (mirror.py): other replicas or a bucket; None: nowhere.
        self.fetch_missing: Callable[[int], object] | None = None

    def path(self, version: int) -> Path:
        return self.root / version_dirname(version)

    # Reading.
    def committed(self) -> list[int]:
        """Complete versions, ascending."""
        found = []
        for child in self.root.iterdir():
            match = _NAME.match(child.name)
            if match and (child / MANIFEST).is_file():
                found.append(int(match.group(1)))
        return sorted(found)

    def latest(self) -> int:
        """Newest committed version; 0 (the base model) when none."""
        versions = self.committed()
        return versions[-1] if versions else 0

    def require(self, version: int) -> Path:
        """The version's directory; raises VersionNotHere (after asking `fetch_missing`) while it is absent."""
        path = self.path(version)
        if (path / MANIFEST).is_file():
            return path
        if self.fetch_missing is not None:
            self.fetch_missing(version)
            raise VersionNotHere(f"version {version} is not in {self.root} yet; a copy has been requested")
        raise VersionNotHere(f"version {version} is not in {self.root} (kept: {self.committed()})")

    def manifest(self, version: int) -> VersionManifest:
        path = self.path(version) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"version {version} is not in {self.root} (kept: {self.committed()})")
        return VersionManifest.model_validate_json(path.read_text())

    # Writing.
    def stage(self, version: int) -> StagedVersion:
        self._remove_undeleted()
        name = f"{_STAGING}{version_dirname(version)}-{self._host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path = self.root / name
        path.mkdir()
        return StagedVersion(version, path)

    def commit(
        self,
        staged: StagedVersion,
        manifest: VersionManifest,
        before_rename: Callable[[], None] | None = None,
    ) -> Path:
        """Makes the staged version visible, complete and durable in one rename; raises VersionExists.

        `before_rename` runs last before the rename (the publisher checks its fence there); if it raises, the
        staging directory is removed and the exception goes on. Any failure removes the staging directory.
        """
        try:
            return self._commit(staged, manifest, before_rename)
        except BaseException:
            self.discard(staged)
            raise

    def _commit(
        self, staged: StagedVersion, manifest: VersionManifest, before_rename: Callable[[], None] | None
    ) -> Path:
        if manifest.info.version != staged.version:
            raise ValueError(f"manifest says version {manifest.info.version}, staged {staged.version}")
        target = self.path(staged.version)
        files = sorted(p.name for p in staged.path.iterdir() if p.is_file() and p.name != MANIFEST)
        final = manifest.model_copy(
            update={"files": files, "info": manifest.info.model_copy(update={"path": str(target)})}
        )
        (staged.path / MANIFEST).write_text(final.model_dump_json(indent=2))
        for name in [*files, MANIFEST]:
            _fsync_path(staged.path / name)
        _fsync_path(staged.path)
        if before_rename is not None:
            before_rename()
        if target.exists():
            raise VersionExists(f"version {staged.version} already exists at {target}")
        try:
            os.rename(staged.path, target)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):  # someone committed it in between
                raise VersionExists(f"version {staged.version} already exists at {target}") from exc
            raise  # permissions, a full or read-only disk: not a conflict, and the caller must know which
        _fsync_path(self.root)
        return target

    def commit_copy(self, staged: StagedVersion) -> Path:
        """Makes a version copied from elsewhere, manifest included, visible in one rename, once every file its
        manifest lists is there; raises VersionExists when it is already here. Any failure removes the copy."""
        try:
            path = staged.path / MANIFEST
            manifest = VersionManifest.model_validate_json(path.read_text())
            if manifest.info.version != staged.version:
                raise ValueError(f"copied manifest of version {manifest.info.version}, not {staged.version}")
            missing = [name for name in manifest.files if not (staged.path / name).is_file()]
            if missing:
                raise FileNotFoundError(f"version {staged.version}'s copy lacks {', '.join(missing)}")
            for name in [*manifest.files, MANIFEST]:
                _fsync_path(staged.path / name)
            _fsync_path(staged.path)
            return self._rename_into_place(staged)
        except BaseException:
            self.discard(staged)
            raise

    def _rename_into_place(self, staged: StagedVersion) -> Path:
        target = self.path(staged.version)
        if target.exists():
            raise VersionExists(f"version {staged.version} already exists at {target}")
        try:
            os.rename(staged.path, target)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise VersionExists(f"version {staged.version} already exists at {target}") from exc
            raise
        _fsync_path(self.root)
        return target

    def discard(self, staged: StagedVersion) -> None:
        shutil.rmtree(staged.path, ignore_errors=True)
        if staged.path.exists():
            self._undeleted.add(staged.path)

    def _remove_undeleted(self) -> None:
        for path in list(self._undeleted):
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                self._undeleted.discard(path)

    def delete(self, version: int) -> None:
        """Removes a version: renamed out of sight first, so it is never seen half-deleted."""
        source = self.path(version)
        if not source.exists():
            return
        trash = self.root / f"{_TRASH}{version_dirname(version)}-{uuid.uuid4().hex[:8]}"
        os.rename(source, trash)
        _fsync_path(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def prune(self, keep: int, protect: Iterable[int] = ()) -> list[int]:
        """Deletes the oldest versions beyond the newest `keep`, never one in `protect`; returns those deleted."""
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        protected = set(protect)
        versions = self.committed()
        doomed = [v for v in versions[: max(0, len(versions) - keep)] if v not in protected]
        for version in doomed:
            self.delete(version)
        return doomed

    def clean_leftovers(self, stale_after_s: float = 3600.0) -> list[str]:
        """Removes what crashed writers left: staging dirs of dead processes on this host, or old ones, and trash."""
        removed = []
        now = time.time()
        for child in self.root.iterdir():
            if child.name.startswith(_TRASH):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child.name)
            elif child.name.startswith(_STAGING):
                parts = child.name.split("-")  # .staging, vNNNNNN, host, pid, suffix
                ours = len(parts) >= 5 and parts[2] == self._host
                dead = ours and parts[3].isdigit() and not _pid_alive(int(parts[3]))
                old = now - child.stat().st_mtime > stale_after_s
                if dead or old:
                    shutil.rmtree(child, ignore_errors=True)
                    removed.append(child.name)
        return removed
