"""Rollout through a real Redis: the operator against kmock, replicas simulated by their heartbeats.

Each simulated replica does what a worker does: read the rollout pointer, load what it names for this replica,
and report the loaded version in its heartbeat. Feedback counters are written as the trainer writes them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import redis
from alchemist_operator.operator_config import OperatorConfig
from alchemist_operator.rollout import FeedbackCounts, Phase, RolloutState
from alchemist_operator.rollout_store import (
    feedback_lag,
    read_snapshot,
    state_from_redis,
    state_to_redis,
    write_state,
)
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import FEEDBACK_GROUP, JobKeys
from alchemist_protocol.rollout_state import load_rollout
from alchemist_protocol.schemas import ArtifactKind, FeedbackLabel, ReplicaState, VersionInfo
from kmock import KubernetesEmulator

from tests.operator.conftest import JOBS, eventually, job_manifest, running_operator, set_ready

NS = "team-a"
JOB_PATH = f"/apis/alchemist.dev/v1alpha1/namespaces/{NS}/continuallearningjobs"
REPLICAS = ("chat-0", "chat-1", "chat-2")
CANARY_SPEC = {
    "replicas": 3,
    "rollout": {
        "strategy": "Canary",
        "canary": {"replicas": 1, "minFeedback": 10, "maxAcceptanceDrop": 0.1, "autoRollback": True},
    },
}


def store_for(redis_url: str) -> JobStore:
    return JobStore.from_url(redis_url, NS, "chat")


def publish(store: JobStore, version: int) -> None:
    store.publish_version(
        VersionInfo(version=version, parent=version - 1, kind=ArtifactKind.LORA, path=f"/v/{version}")
    )


def give_feedback(store: JobStore, version: int, accepted: int, rejected: int) -> None:
    for _ in range(accepted):
        store.count_feedback(version, FeedbackLabel.POSITIVE)
    for _ in range(rejected):
        store.count_feedback(version, FeedbackLabel.NEGATIVE)


@contextlib.asynccontextmanager
async def simulated_replicas(store: JobStore, names: tuple[str, ...] = REPLICAS) -> AsyncIterator[None]:
    async def replica(name: str) -> None:
        while True:
            wanted = store.get_rollout().version_for(name) if store.has_rollout() else 0
            store.report_replica(ReplicaState(replica=name, loaded_version=wanted, ready=True), ttl_seconds=2)
            await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(replica(name)) for name in names]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def job_status(kube: KubernetesEmulator) -> dict[str, Any]:
    return dict(kube.objects[JOBS, NS, "chat"].get("status") or {})


def rollout_status(kube: KubernetesEmulator) -> dict[str, Any]:
    return dict(job_status(kube).get("rollout") or {})


def reasons(kube: KubernetesEmulator) -> list[str]:
    return [r.data["reason"] for r in kube if r.method.value == "POST" and r.url.path.endswith("/events")]


async def start_canary_of(kube: KubernetesEmulator, store: JobStore, version: int) -> None:
    publish(store, version)
    await eventually(
        lambda: rollout_status(kube).get("canaryVersion") == version, what=f"canary of {version}"
    )
    pointer = store.get_rollout()
    assert pointer.canary_version == version and pointer.canary_replicas == ["chat-2"]
    await eventually(lambda: "CanaryStarted" in reasons(kube))
    await eventually(lambda: job_status(kube).get("replicaVersions", {}).get("chat-2") == version)
    assert job_status(kube)["phase"] == "Progressing"


async def test_canary_promoted_then_a_worse_one_rolled_back(
    kube: KubernetesEmulator, operator_config: OperatorConfig, redis_url: str
) -> None:
    store = store_for(redis_url)
    await kube.post(JOB_PATH, json=job_manifest(**CANARY_SPEC))
    async with running_operator(operator_config), simulated_replicas(store):
        await set_ready(kube, 3, 3)
        await eventually(lambda: job_status(kube).get("replicaVersions") == dict.fromkeys(REPLICAS, 0))
        assert store.has_rollout()  # the operator took charge of the pointer

        # Version 1: the canary serves as well as the base model, so it is promoted.
        give_feedback(store, 0, accepted=30, rejected=10)  # before the canary: not counted
        await start_canary_of(kube, store, 1)
        assert reasons(kube).count("CanaryStarted") == 1
        give_feedback(store, 0, accepted=8, rejected=2)  # stable: 80%
        give_feedback(store, 1, accepted=5, rejected=1)  # canary: not enough yet
        await eventually(lambda: rollout_status(kube).get("canaryFeedback") == 6)
        assert rollout_status(kube)["phase"] == "Canary" and store.get_rollout().stable_version == 0
        give_feedback(store, 1, accepted=4, rejected=0)  # canary: 9/10 = 90%
        await eventually(lambda: job_status(kube).get("currentVersion") == 1, what="promotion of version 1")
        assert store.get_rollout().canary_version is None
        await eventually(lambda: "CanaryPromoted" in reasons(kube))  # Events are posted from a queue
        await eventually(lambda: job_status(kube).get("replicaVersions") == dict.fromkeys(REPLICAS, 1))
        await eventually(lambda: job_status(kube).get("phase") == "Running")
        rollout = next(c for c in job_status(kube)["conditions"] if c["type"] == "RolloutProgressing")
        assert (rollout["status"], rollout["reason"]) == ("False", "RolloutComplete")

        # Version 2: its acceptance drops by far more than 10 points, so it is rolled back and rejected.
        await start_canary_of(kube, store, 2)
        give_feedback(store, 1, accepted=10, rejected=0)  # stable: 100%
        give_feedback(store, 2, accepted=3, rejected=7)  # canary: 30%
        await eventually(
            lambda: rollout_status(kube).get("rejectedVersions") == [2], what="rollback of version 2"
        )
        pointer = store.get_rollout()
        assert (
            pointer.stable_version == 1 and pointer.canary_version is None and pointer.canary_replicas == []
        )
        assert job_status(kube)["currentVersion"] == 1
        await eventually(lambda: "CanaryRolledBack" in reasons(kube))
        warning = next(
            r.data for r in kube if r.url.path.endswith("/events") and r.data["reason"] == "CanaryRolledBack"
        )
        assert (
            warning["type"] == "Warning" and "30.0%" in warning["message"] and "100.0%" in warning["message"]
        )
        # The trainer is told to continue from the stable version, and the canary replica goes back to it.
        rollback = store.get_rollback()
        assert rollback is not None and rollback.version == 1
        await eventually(lambda: job_status(kube).get("replicaVersions") == dict.fromkeys(REPLICAS, 1))

        # A rejected version is never tried again; the next one is.
        await asyncio.sleep(0.5)
        assert store.get_rollout().canary_version is None
        await start_canary_of(kube, store, 3)


async def test_immediate_rollout_and_a_restarted_operator_resumes_from_redis(
    kube: KubernetesEmulator, operator_config: OperatorConfig, redis_url: str
) -> None:
    store = store_for(redis_url)
    await kube.post(JOB_PATH, json=job_manifest(replicas=3))
    async with simulated_replicas(store):
        async with running_operator(operator_config):
            await set_ready(kube, 3, 3)
            publish(store, 1)
            publish(store, 2)
            await eventually(lambda: job_status(kube).get("replicaVersions") == dict.fromkeys(REPLICAS, 2))
            assert job_status(kube)["currentVersion"] == 2
            await eventually(lambda: "VersionRolledOut" in reasons(kube))
            # Switch to Canary while running: the next version goes to one replica first.
            await kube.patch(f"{JOB_PATH}/chat", json={"spec": CANARY_SPEC})
            await eventually(lambda: rollout_status(kube).get("strategy") == "Canary")
            await start_canary_of(kube, store, 3)
        # Another operator replica takes over mid-canary: it picks the canary up from Redis, not from scratch.
        started = load_rollout(store.client, store.keys)[1].started_at
        async with running_operator(operator_config):
            give_feedback(store, 2, accepted=10, rejected=0)
            give_feedback(store, 3, accepted=10, rejected=0)
            await eventually(lambda: job_status(kube).get("currentVersion") == 3)
        assert started is not None
        assert reasons(kube).count("CanaryStarted") == 1


def test_rollout_state_round_trips_through_redis(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client, JobKeys(NS, "chat"))
    state = RolloutState(
        stable=3,
        phase=Phase.HELD,
        candidate=4,
        canary_replicas=("chat-2",),
        started_at=1234.5,
        stable_baseline=FeedbackCounts(7, 9),
        canary_baseline=FeedbackCounts(0, 1),
        rejected=(2,),
        message="held",
    )
    write_state(store, state)
    pointer, progress = load_rollout(redis_client, store.keys)
    assert state_from_redis(pointer, progress) == state
    assert pointer is not None and pointer.version_for("chat-2") == 4 and pointer.version_for("chat-0") == 3
    assert state_from_redis(*state_to_redis(RolloutState(stable=1))) == RolloutState(stable=1)
    assert state_from_redis(None, progress) == RolloutState()


def test_snapshot_reads_versions_replicas_counters_and_lag(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client, JobKeys(NS, "chat"))
    assert read_snapshot(store, store.keys.feedback, now=1.0).pointer_exists is False
    publish(store, 1)
    store.report_replica(ReplicaState(replica="chat-0", loaded_version=0, ready=True), ttl_seconds=10)
    store.report_replica(ReplicaState(replica="chat-1", loaded_version=0, ready=False), ttl_seconds=10)
    give_feedback(store, 0, accepted=2, rejected=1)
    for i in range(5):
        redis_client.xadd(store.keys.feedback, {"request_id": f"r{i}", "label": "positive"})
    snapshot = read_snapshot(store, store.keys.feedback, now=1.0)
    assert snapshot.observation.published == (1,)
    assert snapshot.ready_replicas == ("chat-0",)  # only ready replicas can become canaries
    assert snapshot.replica_versions == {"chat-0": 0, "chat-1": 0}
    assert snapshot.observation.counts_for(0) == FeedbackCounts(2, 3)
    assert snapshot.feedback_lag == 5  # no trainer group yet: every entry waits
    redis_client.xgroup_create(store.keys.feedback, FEEDBACK_GROUP, id="0")
    redis_client.xreadgroup(FEEDBACK_GROUP, "chat-0", {store.keys.feedback: ">"}, count=2)
    assert feedback_lag(redis_client, store.keys.feedback) == 5  # 2 pending + 3 undelivered
    entries = redis_client.xrange(store.keys.feedback, count=2)
    redis_client.xack(store.keys.feedback, FEEDBACK_GROUP, *[e[0] for e in entries])
    assert feedback_lag(redis_client, store.keys.feedback) == 3
    assert feedback_lag(redis_client, "no-such-stream") == 0
