"""Deleting a job never waits for the operator: jobs carry no finalizer, and a job's monitor ends with it."""

from __future__ import annotations

import asyncio

from alchemist_operator.operator_config import OperatorConfig
from kmock import KubernetesEmulator

from tests.operator.conftest import JOBS, eventually, has_object, job_manifest, running_operator

NS = "team-a"
JOB_PATH = f"/apis/alchemist.dev/v1alpha1/namespaces/{NS}/continuallearningjobs"
OLD_FINALIZER = "alchemist.dev/finalizer"  # what operators before this one put on every job


def finalizers(kube: KubernetesEmulator, name: str = "chat") -> list[str]:
    return list(kube.objects[JOBS, NS, name]["metadata"].get("finalizers") or [])


def monitor_looks(kube: KubernetesEmulator, name: str = "chat") -> int:
    """How often the job's monitor read its StatefulSet: once per look, whether or not the status changed."""
    path = f"/apis/apps/v1/namespaces/{NS}/statefulsets/{name}"
    return sum(1 for r in kube if r.method.value == "GET" and r.url.path == path)


async def test_a_job_is_deleted_at_once_while_the_operator_is_gone(
    kube: KubernetesEmulator, operator_config: OperatorConfig
) -> None:
    await kube.post(JOB_PATH, json=job_manifest(replicas=1))
    async with running_operator(operator_config):
        await eventually(lambda: has_object(kube, "apps/v1/statefulsets", NS, "chat"), what="the StatefulSet")
        await eventually(lambda: (kube.objects[JOBS, NS, "chat"].get("status") or {}).get("phase"))
        assert finalizers(kube) == []
    # The operator is down (uninstalled, crashed, scaled to zero): nothing blocks the deletion.
    response = await kube.delete(f"{JOB_PATH}/chat")
    assert response.status == 200
    assert not has_object(kube, JOBS, NS, "chat")


async def test_the_finalizer_an_older_operator_left_is_removed(
    kube: KubernetesEmulator, operator_config: OperatorConfig
) -> None:
    old = job_manifest(replicas=1)
    # Only ours: kmock never bumps resourceVersion, so kopf's guarded JSON patch (test resourceVersion, remove
    # finalizers/N), which a real API server refuses once applied, could be applied twice and remove a neighbour.
    old["metadata"]["finalizers"] = [OLD_FINALIZER]
    await kube.post(JOB_PATH, json=old)
    async with running_operator(operator_config):
        await eventually(lambda: finalizers(kube) == [], what="the old finalizer removed")
    response = await kube.delete(f"{JOB_PATH}/chat")
    assert response.status == 200 and not has_object(kube, JOBS, NS, "chat")


async def test_the_monitor_of_a_deleted_job_stops(
    kube: KubernetesEmulator, operator_config: OperatorConfig
) -> None:
    await kube.post(JOB_PATH, json=job_manifest(replicas=1))
    await kube.post(JOB_PATH, json=job_manifest(name="other", replicas=1))
    async with running_operator(operator_config):
        await eventually(lambda: monitor_looks(kube) > 2 and monitor_looks(kube, "other") > 2)
        response = await kube.delete(f"{JOB_PATH}/chat")
        assert response.status == 200
        await asyncio.sleep(5 * operator_config.monitor_interval_seconds)  # a look already under way ends
        after_delete, other_before = monitor_looks(kube), monitor_looks(kube, "other")
        # Five more looks of the other job's monitor: a monitor left behind for the deleted job would look too.
        await eventually(
            lambda: monitor_looks(kube, "other") >= other_before + 5, what="the other job's monitor"
        )
        assert monitor_looks(kube) == after_delete
