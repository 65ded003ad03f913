"""Reads what the rollout state machine needs from Redis and writes its decisions back.

Synchronous, like `JobStore`: the operator calls these in a worker thread. Key names and payloads come from
`alchemist_protocol`; this module only translates between them and the pure `rollout` types.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis
from alchemist_protocol.feedback_stream import LAG_COUNT_CAP
from alchemist_protocol.feedback_stream import feedback_lag as stream_lag
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import FEEDBACK_GROUP
from alchemist_protocol.rollout_state import CounterSnapshot, RolloutProgress, load_rollout, save_rollout
from alchemist_protocol.schemas import FeedbackLabel, RolloutPointer
from alchemist_protocol.training_group import GroupRecord, TrainingGroupStore

from alchemist_operator.rollout import FeedbackCounts, Observation, Phase, RolloutState, versions_to_count


@dataclass(frozen=True)
class RedisSnapshot:
    state: RolloutState
    observation: Observation
    replica_versions: dict[str, int]  # every replica with a fresh heartbeat -> the version it has loaded
    ready_replicas: tuple[str, ...]
    feedback_lag: int
    latest_version: int
    pointer_exists: bool  # False until an operator first writes the pointer
    training_group: GroupRecord | None = None  # the data-parallel group's current generation


def state_from_redis(pointer: RolloutPointer | None, progress: RolloutProgress) -> RolloutState:
    if pointer is None:
        return RolloutState()
    rejected = tuple(progress.rejected_versions)
    if pointer.canary_version is None or not pointer.canary_replicas:
        return RolloutState(
            stable=pointer.stable_version,
            rejected=rejected,
            message=progress.message,
            held=tuple(progress.held_versions),
        )
    phase = Phase(progress.phase) if progress.phase in (Phase.CANARY, Phase.HELD) else Phase.CANARY
    return RolloutState(
        stable=pointer.stable_version,
        phase=phase,
        candidate=pointer.canary_version,
        canary_replicas=tuple(pointer.canary_replicas),
        started_at=progress.started_at if progress.started_at is not None else time.time(),
        stable_baseline=FeedbackCounts(progress.stable_baseline.positive, progress.stable_baseline.total),
        canary_baseline=FeedbackCounts(progress.canary_baseline.positive, progress.canary_baseline.total),
        rejected=rejected,
        message=progress.message,
        held=tuple(progress.held_versions),
    )


def state_to_redis(state: RolloutState) -> tuple[RolloutPointer, RolloutProgress]:
    pointer = RolloutPointer(
        stable_version=state.stable,
        canary_version=state.candidate,
        canary_replicas=list(state.canary_replicas),
    )
    progress = RolloutProgress(
        phase=state.phase.value,
        started_at=state.started_at,
        stable_baseline=CounterSnapshot(
            positive=state.stable_baseline.positive, total=state.stable_baseline.total
        ),
        canary_baseline=CounterSnapshot(
            positive=state.canary_baseline.positive, total=state.canary_baseline.total
        ),
        rejected_versions=list(state.rejected),
        message=state.message,
        held_versions=list(state.held),
    )
    return pointer, progress


def feedback_counts(store: JobStore, version: int) -> FeedbackCounts:
    counts = store.feedback_counts(version)
    return FeedbackCounts(positive=counts[FeedbackLabel.POSITIVE], total=sum(counts.values()))


def feedback_lag(client: redis.Redis, stream: str) -> int:
    """Entries of the feedback stream the trainers have not acknowledged yet (pending or not yet delivered).

    `client` should return bytes (JobStore.stream_client): an entry that is not UTF-8 then cannot fail it.
    """
    return stream_lag(client, stream, FEEDBACK_GROUP, LAG_COUNT_CAP).entries


def read_snapshot(store: JobStore, feedback_stream: str, now: float) -> RedisSnapshot:
    pointer, progress = load_rollout(store.client, store.keys)
    state = state_from_redis(pointer, progress)
    published = tuple(store.version_numbers())
    replicas = store.live_replicas()
    ready = tuple(r.replica for r in replicas if r.ready)
    held = {
        v: "; ".join(info.evaluation.reasons if info.evaluation is not None else [])
        for v, info in store.held_versions(above=state.stable).items()
    }
    counts = {v: feedback_counts(store, v) for v in versions_to_count(state, published, held)}
    return RedisSnapshot(
        state=state,
        observation=Observation(now=now, published=published, live_replicas=ready, counts=counts, held=held),
        replica_versions={r.replica: r.loaded_version for r in replicas},
        ready_replicas=ready,
        feedback_lag=feedback_lag(store.stream_client, feedback_stream),
        latest_version=max(published, default=0),
        pointer_exists=pointer is not None,
        training_group=read_training_group(store),
    )


def read_training_group(store: JobStore) -> GroupRecord | None:
    """The group record the trainers' leader wrote; None when there is none (or it cannot be read)."""
    try:
        return TrainingGroupStore(store.client, store.keys).read()
    except ValueError:  # written by another version of the worker: the status goes without it
        return None


def write_state(store: JobStore, state: RolloutState) -> None:
    pointer, progress = state_to_redis(state)
    save_rollout(store.client, store.keys, pointer, progress)


def request_trainer_rollback(store: JobStore, version: int, reason: str) -> None:
    """Asks the trainer to continue from `version`, so its next version does not build on the rejected one."""
    store.request_rollback(version, reason)
