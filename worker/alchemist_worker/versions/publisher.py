"""Committing a training step as a version, and repairing Redis from the versions directory after a crash.

The commit protocol, in this order:
1. the version's files go to the versions directory atomically (directory.py); right before the rename the
   committer checks that its fencing token (lease.py) is still the lease's, so a holder paused past its lease
   usually stops here, with only its staging directory (removed) behind it. The directory is now durable;
2. the fenced commit in Redis (JobStore.commit_version, one Lua script): published only while the token is
   still current and the head is the one the version was built on. This is the commit point of the lineage:
   followers serve only what Redis lists, so a fenced-out writer's directory is never served;
3. the feedback it trained on is finalized: marked trained, counted for its serving version, acknowledged;
4. versions beyond the newest K are deleted, never one that a replica serves or the rollout pointer names.

A commit that fails half-way is recovered, never forked: the caller keeps the draft and retries it as is (same
version number, same feedback ids, same `writer`); a retry finds its own directory (by `writer`) and only
re-runs the Redis part, and the script answers COMMITTED again if an earlier attempt went through but its reply
was lost. If the writer dies instead, the next lease holder's `reconcile()` adopts a directory that extends the
head by one (publishing it under its own token and finalizing its feedback) and discards any other unpublished
one (its feedback stays pending and trains again). A refused writer never deletes its renamed directory: the
new holder may be adopting it. Failures are classified (CommitConflict, CommitIOError, RedisUnavailable) so the
caller restarts, retries or waits as each needs. The same repair runs when Redis restarts empty: versions and
the trained-feedback set are rebuilt from the directory.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import redis
from alchemist_protocol.job_store import JobStore, VersionCommit
from alchemist_protocol.schemas import ArtifactKind, EvaluationReading, VersionInfo

from alchemist_worker.feedback.consumer import SettledFeedback, finalize_feedback, finalize_script
from alchemist_worker.versions.directory import (
    TrainedFeedback,
    VersionDirectory,
    VersionExists,
    VersionManifest,
)

log = logging.getLogger(__name__)


@dataclass
class VersionDraft:
    """A step's outcome, ready to become a version."""

    version: int
    parent: int
    kind: ArtifactKind
    write_files: Callable[[Path], None]  # writes the artifact (and trainer state) into the staging directory
    feedback: list[SettledFeedback]
    loss: float | None = None
    samples: int = 0
    training: dict[str, Any] = field(default_factory=dict)
    feedback_ranges: list[tuple[str, str]] = field(default_factory=list)
    expected_head: int | None = None  # the newest published version it builds on; None: any older head
    writer: str = field(default_factory=lambda: uuid.uuid4().hex)  # one per draft, kept across retries
    evaluation: EvaluationReading | None = None  # the evaluation gate's reading, published with the version


class CommitFailure(Exception):
    """A version was not committed; `kind` names what went wrong, for metrics and for the caller's reaction."""

    kind: ClassVar[str] = "unknown"


class CommitConflict(CommitFailure):
    """Another trainer holds the lease or published first: retrying cannot help, restart from the newest version."""

    kind = "conflict"


class CommitIOError(CommitFailure):
    """The versions directory refused a write (permissions, a full or read-only disk): retry later, unchanged."""

    kind = "io"


class RedisUnavailable(CommitFailure):
    """Redis did not answer: retry later, unchanged (the version directory, if written, is reused)."""

    kind = "redis"


@dataclass(frozen=True)
class ReconcileReport:
    republished: list[int]
    refinalized: int
    removed_leftovers: list[str]
    discarded: list[int] = field(default_factory=list)


def _to_manifest_feedback(items: Iterable[SettledFeedback]) -> list[TrainedFeedback]:
    return [
        TrainedFeedback(
            feedback_id=i.feedback_id,
            entry_ids=list(i.entry_ids),
            label=i.label,
            served_version=i.served_version,
        )
        for i in items
    ]


def _from_manifest_feedback(items: Iterable[TrainedFeedback]) -> list[SettledFeedback]:
    return [SettledFeedback(i.feedback_id, list(i.entry_ids), i.label, i.served_version) for i in items]


def entry_ranges(entry_ids: Sequence[str]) -> list[tuple[str, str]]:
    """The (first, last) stream ids of a step's entries, as one range; the manifest lists each id."""
    if not entry_ids:
        return []
    ordered = sorted(entry_ids, key=lambda e: tuple(int(p) for p in e.split("-", 1)))
    return [(ordered[0], ordered[-1])]


class Uploader(Protocol):
    """Copies a committed directory to shared storage before Redis publishes it (s3_versions.py)."""

    def upload(self, path: Path, manifest: VersionManifest) -> VersionInfo: ...

    def delete(self, info: VersionInfo) -> None: ...


class VersionPublisher:
    def __init__(
        self,
        directory: VersionDirectory,
        store: JobStore,
        replica: str,
        keep: int,
        uploader: Uploader | None = None,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = directory
        self.store = store
        self.replica = replica
        self.keep = keep
        self.uploader = uploader
        self._finalize = finalize_script(store.client)

    def commit(
        self, draft: VersionDraft, fence: str | None = None, after_files: Callable[[], None] | None = None
    ) -> VersionInfo:
        """Publishes and finalizes a version; raises a CommitFailure subclass.

        `fence` is the committer's lease token (None only outside the trainer, e.g. tools and tests).
        `after_files` runs right after the directory write (tests use it to fail there).
        """
        info = self.publish(draft, fence, after_files)
        self.finalize(draft)
        return info

    def publish(
        self, draft: VersionDraft, fence: str | None = None, after_files: Callable[[], None] | None = None
    ) -> VersionInfo:
        """Steps 1 and 2: the directory (or our own from an earlier attempt), then the fenced Redis commit."""
        try:
            info = self._own_directory(draft) or self._write(draft, fence)
            info = self._uploaded(draft.version, info)
            if after_files is not None:
                after_files()
            outcome = self.store.commit_version(info, fence, draft.expected_head)
        except VersionExists as exc:
            raise CommitConflict(f"{exc}: published by another trainer, or left by one") from exc
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis unavailable committing version {draft.version}: {exc}") from exc
        except OSError as exc:
            raise CommitIOError(
                f"cannot write version {draft.version} to {self.directory.root}: {exc}"
            ) from exc
        if outcome is not VersionCommit.COMMITTED:
            if outcome is not VersionCommit.FENCED:
                self.withdraw(draft)  # nobody else can commit it: our token still holds
            raise CommitConflict(
                f"version {draft.version} refused by Redis ({outcome.value}): "
                + ("another replica holds the trainer lease" if outcome is VersionCommit.FENCED
                   else f"the head is no longer {draft.expected_head}")
            )  # fmt: skip
        return info

    def finalize(self, draft: VersionDraft) -> None:
        """Step 3, idempotent; raises RedisUnavailable (the version is committed all the same)."""
        try:
            finalize_feedback(self._finalize, self.store.keys, draft.feedback)
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis unavailable acknowledging version {draft.version}: {exc}") from exc

    def _uploaded(self, version: int, info: VersionInfo) -> VersionInfo:
        """The metadata to publish: with an uploader, the version is in shared storage first (its path there)."""
        if self.uploader is None:
            return info
        return self.uploader.upload(self.directory.path(version), self.directory.manifest(version))

    def _own_directory(self, draft: VersionDraft) -> VersionInfo | None:
        """The version's metadata if an earlier attempt of this draft already wrote its directory."""
        try:
            manifest = self.directory.manifest(draft.version)
        except FileNotFoundError:
            return None
        return manifest.info if manifest.writer == draft.writer else None

    def _write(self, draft: VersionDraft, fence: str | None) -> VersionInfo:
        staged = self.directory.stage(draft.version)
        try:
            draft.write_files(staged.path)
        except BaseException:
            self.directory.discard(staged)
            raise
        info = VersionInfo(
            version=draft.version,
            parent=draft.parent,
            kind=draft.kind,
            path="",
            loss=draft.loss,
            samples=draft.samples,
            training=draft.training,
            feedback_ranges=draft.feedback_ranges,
            trained_by=self.replica,
            evaluation=draft.evaluation,
        )
        manifest = VersionManifest(
            info=info, feedback=_to_manifest_feedback(draft.feedback), writer=draft.writer
        )

        def check_fence() -> None:
            if fence is not None and not self.store.holds_fence(fence):
                raise CommitConflict(f"version {draft.version} not written: the trainer lease was taken over")

        self.directory.commit(staged, manifest, before_rename=check_fence)
        return self.directory.manifest(draft.version).info

    def withdraw(self, draft: VersionDraft) -> None:
        """Removes this draft's own directory after Redis refused it; never a published or a foreign one."""
        path = self.directory.path(draft.version)
        if self._own_directory(draft) is None:
            return
        aside = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
        path.rename(aside)  # out of sight first: a version is complete or absent at every instant
        if self.store.get_version(draft.version) is not None:  # adopted meanwhile by a new holder's reconcile
            aside.rename(path)
            return
        shutil.rmtree(aside, ignore_errors=True)

    def prune(self, protect: Iterable[int] = ()) -> list[int]:
        """Deletes versions beyond the newest K, keeping any a live replica serves or the pointer names."""
        keep = set(protect)
        for replica in self.store.live_replicas():
            keep.add(replica.loaded_version)
        if self.store.has_rollout():
            pointer = self.store.get_rollout()
            keep.add(pointer.stable_version)
            if pointer.canary_version is not None:
                keep.add(pointer.canary_version)
        rollback = self.store.get_rollback()
        if rollback is not None:
            keep.add(rollback.version)
        removed = self.directory.prune(self.keep, keep)
        if self.directory.fetch_missing is not None:  # held elsewhere too: Redis lists more than the disk
            listed = self.store.version_numbers()
            removed += [v for v in listed[: -self.keep] if v not in keep and v not in removed]
        for version in removed:
            info = self.store.get_version(version) if self.uploader is not None else None
            self.store.forget_version(version)
            if info is not None and self.uploader is not None:
                self.uploader.delete(info)
        return removed

    def reconcile(self, fence: str | None = None) -> ReconcileReport:
        """Completes whatever a crash (or a Redis restart) interrupted; run by the lease holder with its token.

        A directory Redis does not list is adopted when it extends the head by one (or when Redis lists nothing,
        after a data loss), through the same fenced commit as a training step; any other unpublished directory
        is a fenced-out or abandoned sibling and is discarded, its feedback left to train again. Raises
        CommitConflict when the lease was lost meanwhile.
        """
        leftovers = self.directory.clean_leftovers()
        republished: list[int] = []
        discarded: list[int] = []
        refinalized = 0
        published = set(self.store.version_numbers())
        on_disk = self.directory.committed()
        if self.directory.fetch_missing is None:  # else it may be held elsewhere (mirror.py): keep it
            for version in sorted(published - set(on_disk)):  # deleted from disk, killed before Redis heard
                self.store.forget_version(version)
        for version in on_disk:
            manifest = self.directory.manifest(version)
            if version not in published:
                head = self.store.latest_version()
                try:
                    info = self._uploaded(version, manifest.info)
                except OSError as exc:
                    raise CommitIOError(f"reconciling version {version}: {exc}") from exc
                outcome = self.store.commit_version(info, fence, version - 1 if head else None)
                if outcome is VersionCommit.FENCED:
                    raise CommitConflict(f"reconciling version {version}: the trainer lease was taken over")
                if outcome is VersionCommit.TAKEN:  # Redis has another record of it: leave both as they are
                    log.error(
                        "version %d is in Redis with other metadata than in %s", version, manifest.info.path
                    )
                    continue
                if outcome is VersionCommit.MOVED:
                    log.warning("discarding version %d: not committed and not next to head %d", version, head)
                    self.directory.delete(version)
                    discarded.append(version)
                    continue
                republished.append(version)
            refinalized += finalize_feedback(
                self._finalize, self.store.keys, _from_manifest_feedback(manifest.feedback)
            )
        if republished or refinalized or discarded:
            log.info(
                "reconciled versions %s, discarded %s, re-finalized %d feedback ids",
                republished,
                discarded,
                refinalized,
            )
        return ReconcileReport(republished, refinalized, leftovers, discarded)
