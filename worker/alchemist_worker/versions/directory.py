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
version fails, which also fences two trainers racing for the same number. Deleting renames first, so a
version is either complete or absent at every instant, whatever kills the process. Imports no torch.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from alchemist_protocol.schemas import VersionInfo
from pydantic import BaseModel, ConfigDict, Field

MANIFEST = "alchemist-version.json"
_NAME = re.compile(r"^v(\d{6,})$")
_STAGING = ".staging-"
_TRASH = ".trash-"


class VersionExists(RuntimeError):
    """Another writer committed this version number first."""


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

    def manifest(self, version: int) -> VersionManifest:
        path = self.path(version) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"version {version} is not in {self.root} (kept: {self.committed()})")
        return VersionManifest.model_validate_json(path.read_text())

    # Writing.
    def stage(self, version: int) -> StagedVersion:
        name = f"{_STAGING}{version_dirname(version)}-{self._host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path = self.root / name
        path.mkdir()
        return StagedVersion(version, path)

    def commit(self, staged: StagedVersion, manifest: VersionManifest) -> Path:
        """Makes the staged version visible, complete and durable in one rename; raises VersionExists."""
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
        if target.exists():
            self.discard(staged)
            raise VersionExists(f"version {staged.version} already exists at {target}")
        try:
            os.rename(staged.path, target)
        except OSError as exc:  # ENOTEMPTY/EEXIST: someone committed it in between
            self.discard(staged)
            raise VersionExists(f"version {staged.version} already exists at {target}") from exc
        _fsync_path(self.root)
        return target

    def discard(self, staged: StagedVersion) -> None:
        shutil.rmtree(staged.path, ignore_errors=True)

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
