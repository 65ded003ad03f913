"""A job's state in a real Redis, written through the protocol as the worker and the operator write it."""

from __future__ import annotations

import time

import redis
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import FEEDBACK_GROUP, JobKeys
from alchemist_protocol.rollout_state import CounterSnapshot, RolloutProgress, save_rollout
from alchemist_protocol.schemas import (
    ArtifactKind,
    Feedback,
    FeedbackLabel,
    ReplicaState,
    RolloutPointer,
    VersionInfo,
    dead_letter_fields,
)

NS, JOB = "team-a", "chat"


def store_for(url: str) -> JobStore:
    return JobStore(redis.Redis.from_url(url, decode_responses=True), JobKeys(NS, JOB))


def write_canary_job(store: JobStore) -> None:
    """Versions 1-3 (3 on a canary on chat-2), feedback counters, three replicas (chat-1 stuck on version 1),
    a feedback stream with entries not yet trained, and dead letters with two kinds of reasons."""
    for v, loss, reused, recomputed in ((1, 0.91, 3, 1), (2, 0.52, 4, 0), (3, 0.48, 1, 3)):
        store.publish_version(
            VersionInfo(
                version=v, parent=v - 1, kind=ArtifactKind.LORA, path=f"/v/{v}", loss=loss,
                samples=reused + recomputed, training={"reused": reused, "recomputed": recomputed},
                trained_by="chat-0",
            )
        )  # fmt: skip
    for version, positive, negative in ((2, 30, 10), (3, 12, 8)):
        for _ in range(positive):
            store.count_feedback(version, FeedbackLabel.POSITIVE)
        for _ in range(negative):
            store.count_feedback(version, FeedbackLabel.NEGATIVE)
    save_rollout(
        store.client,
        store.keys,
        RolloutPointer(stable_version=2, canary_version=3, canary_replicas=["chat-2"]),
        RolloutProgress(
            phase="Canary",
            started_at=time.time() - 120,
            stable_baseline=CounterSnapshot(positive=20, total=30),
            canary_baseline=CounterSnapshot(positive=2, total=4),
            message="evaluating",
        ),
    )
    for name, loaded in (("chat-0", 2), ("chat-1", 1), ("chat-2", 3)):
        store.report_replica(ReplicaState(replica=name, loaded_version=loaded, ready=True), ttl_seconds=60)
    stream = store.keys.feedback
    store.client.xgroup_create(stream, FEEDBACK_GROUP, id="$", mkstream=True)
    for i in range(4):
        store.client.xadd(
            stream, Feedback(request_id=f"chatcmpl-{i}", label=FeedbackLabel.POSITIVE).to_fields()
        )
    for i, reason in enumerate(
        ["label: Input should be 'positive', 'negative' or 'correction'"] * 3
        + ["request 'chatcmpl-9' unknown"]
    ):
        fields = {"request_id": f"chatcmpl-x{i}", "label": "meh"}
        store.client.xadd(store.keys.dead_letters, dead_letter_fields(f"1-{i}", fields, reason))
