"""Committing a training step as a version, and repairing Redis from the versions directory after a crash.

The commit protocol, in this order, each part idempotent:
1. the version's files go to the versions directory atomically (directory.py): this is the commit point;
2. its metadata is published to Redis (JobStore.publish_version: metadata, index and event in one MULTI);
3. the feedback it trained on is finalized: marked trained, counted for its serving version, acknowledged;
4. versions beyond the newest K are deleted, never one that a replica serves or the rollout pointer names.

A kill -9 between any two of them leaves a state `reconcile()` completes on restart: a version on disk is
re-published to Redis if missing there (and one gone from disk is forgotten there), and its feedback (listed in
its manifest) finalized again, which the trained set makes harmless. Only the trainer (the lease holder) runs
it: the directory is the job's one shared lineage. A kill before step 1 leaves only a staging directory (cleaned) and unacknowledged
entries, which come back to the consumer and are trained again. The same repair runs when Redis restarts
empty: versions and the trained-feedback set are rebuilt from the directory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alchemist_protocol.job_store import JobStore
from alchemist_protocol.schemas import ArtifactKind, VersionInfo

from alchemist_worker.feedback.consumer import SettledFeedback, finalize_feedback, finalize_script
from alchemist_worker.versions.directory import TrainedFeedback, VersionDirectory, VersionManifest

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


@dataclass(frozen=True)
class ReconcileReport:
    republished: list[int]
    refinalized: int
    removed_leftovers: list[str]


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


class VersionPublisher:
    def __init__(self, directory: VersionDirectory, store: JobStore, replica: str, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = directory
        self.store = store
        self.replica = replica
        self.keep = keep
        self._finalize = finalize_script(store.client)

    def commit(self, draft: VersionDraft, after_files: Callable[[], None] | None = None) -> VersionInfo:
        """Writes, publishes and finalizes a version; raises VersionExists if the number was taken.

        `after_files` runs right after the commit point (tests use it to die there).
        """
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
        )
        manifest = VersionManifest(info=info, feedback=_to_manifest_feedback(draft.feedback))
        self.directory.commit(staged, manifest)  # the commit point
        if after_files is not None:
            after_files()
        committed = self.directory.manifest(draft.version)
        self.store.publish_version(committed.info)
        finalize_feedback(self._finalize, self.store.keys, draft.feedback)
        return committed.info

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
        for version in removed:
            self.store.forget_version(version)
        return removed

    def reconcile(self) -> ReconcileReport:
        """Completes whatever a crash (or a Redis restart) interrupted; safe to run at any time."""
        leftovers = self.directory.clean_leftovers()
        republished = []
        refinalized = 0
        published = set(self.store.version_numbers())
        on_disk = self.directory.committed()
        for version in sorted(published - set(on_disk)):  # deleted from disk, then killed before Redis heard
            self.store.forget_version(version)
        for version in on_disk:
            manifest = self.directory.manifest(version)
            if version not in published:
                self.store.publish_version(manifest.info)
                republished.append(version)
            refinalized += finalize_feedback(
                self._finalize, self.store.keys, _from_manifest_feedback(manifest.feedback)
            )
        if republished or refinalized:
            log.info("reconciled versions %s, re-finalized %d feedback ids", republished, refinalized)
        return ReconcileReport(republished, refinalized, leftovers)
