"""The operator's per-job metrics: set from the status it writes and counted from the rollout decisions it takes,
against kmock and a real Redis (the replicas simulated by their heartbeats)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from alchemist_operator.cli import run
from alchemist_operator.job_metrics import JobMetrics, replicas_not_following
from alchemist_operator.operator_config import OperatorConfig
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.schemas import ReplicaState
from kmock import KubernetesEmulator

from tests.operator.conftest import eventually, job_manifest, set_ready
from tests.operator.test_rollout_redis import (
    CANARY_SPEC,
    JOB_PATH,
    NS,
    REPLICAS,
    give_feedback,
    job_status,
    publish,
    rollout_status,
    simulated_replicas,
    start_canary_of,
    store_for,
)


@contextlib.asynccontextmanager
async def operator_with(config: OperatorConfig, metrics: JobMetrics) -> AsyncIterator[None]:
    task = asyncio.create_task(run(config, metrics=metrics))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def value(metrics: JobMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"namespace": NS, "job_name": "chat", **labels})


async def test_rollback_is_counted_and_versions_exported(
    kube: KubernetesEmulator, operator_config: OperatorConfig, redis_url: str
) -> None:
    store = store_for(redis_url)
    metrics = JobMetrics()
    await kube.post(JOB_PATH, json=job_manifest(**CANARY_SPEC))
    async with operator_with(operator_config, metrics), simulated_replicas(store):
        await set_ready(kube, 3, 3)
        await eventually(lambda: job_status(kube).get("replicaVersions") == dict.fromkeys(REPLICAS, 0))
        await eventually(lambda: value(metrics, "alchemist_job_rollout_phase", phase="Idle") == 1)
        assert value(metrics, "alchemist_job_stable_version") == 0
        # readyReplicas may reach the job's status in a later status write than the rollout phase: wait for it too.
        await eventually(lambda: value(metrics, "alchemist_job_ready_replicas") == 3, what="ready replicas")
        assert value(metrics, "alchemist_job_redis_reachable") == 1

        await start_canary_of(kube, store, 1)
        await eventually(lambda: value(metrics, "alchemist_job_canary_version") == 1)
        assert value(metrics, "alchemist_job_rollout_phase", phase="Canary") == 1
        assert value(metrics, "alchemist_job_rollout_events_total", reason="CanaryStarted") == 1
        give_feedback(store, 0, accepted=10, rejected=0)
        give_feedback(store, 1, accepted=2, rejected=8)
        await eventually(lambda: rollout_status(kube).get("rejectedVersions") == [1], what="rollback")
        await eventually(
            lambda: value(metrics, "alchemist_job_rollout_events_total", reason="CanaryRolledBack") == 1
        )
        await eventually(lambda: value(metrics, "alchemist_job_canary_version") == 0)
        assert value(metrics, "alchemist_job_stable_version") == 0
        assert value(metrics, "alchemist_job_rollout_phase", phase="Canary") == 0


async def test_a_replica_that_does_not_load_its_version_is_counted(
    kube: KubernetesEmulator, operator_config: OperatorConfig, redis_url: str
) -> None:
    store = store_for(redis_url)
    metrics = JobMetrics()
    await kube.post(JOB_PATH, json=job_manifest(replicas=3))  # Immediate rollout
    async with operator_with(operator_config, metrics), simulated_replicas(store, REPLICAS[:2]):
        stuck = asyncio.create_task(_stuck_replica(store, "chat-2"))
        try:
            await set_ready(kube, 3, 3)
            publish(store, 1)
            await eventually(lambda: job_status(kube).get("currentVersion") == 1)
            await eventually(lambda: value(metrics, "alchemist_job_replicas_not_following") == 1)
            assert value(metrics, "alchemist_job_stable_version") == 1
            assert value(metrics, "alchemist_job_target_version") == 1
        finally:
            stuck.cancel()
    # The daemon stopped with the operator: the job's series are gone.
    assert value(metrics, "alchemist_job_stable_version") is None


async def _stuck_replica(store: JobStore, name: str) -> None:
    while True:
        store.report_replica(ReplicaState(replica=name, loaded_version=0, ready=True), ttl_seconds=2)
        await asyncio.sleep(0.05)


def test_replicas_not_following_reads_the_status() -> None:
    status = {
        "rollout": {"stableVersion": 4, "canaryVersion": 5, "canaryReplicas": ["a-2"]},
        "replicaVersions": {"a-0": 4, "a-1": 3, "a-2": 4},
    }
    assert replicas_not_following(status) == {"a-1": (3, 4), "a-2": (4, 5)}
    assert replicas_not_following({}) == {}
