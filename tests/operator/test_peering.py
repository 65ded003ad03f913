"""High availability: operator replicas meet in a KopfPeering object; only the highest priority works.

The test runs one operator replica and plays the other by writing that replica's record into the peering object,
as its keep-alive would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging

import pytest
from alchemist_operator.operator_config import OperatorConfig
from kmock import KubernetesEmulator

from tests.operator.conftest import eventually, has_object, job_manifest, running_operator

NS = "team-a"
PEERINGS = f"/apis/kopf.dev/v1/namespaces/{NS}/kopfpeerings"
JOB_PATH = f"/apis/alchemist.dev/v1alpha1/namespaces/{NS}/continuallearningjobs"


def peers(kube: KubernetesEmulator) -> dict[str, int]:
    status = dict(kube.objects["kopf.dev/v1/kopfpeerings", NS, "alchemist"].get("status") or {})
    return {peer: info["priority"] for peer, info in status.items() if info}


async def announce(kube: KubernetesEmulator, peer: str, priority: int | None) -> None:
    """Another operator replica's heartbeat in the peering object (None: it left)."""
    now = datetime.datetime.now(datetime.UTC).isoformat()
    record = None if priority is None else {"priority": priority, "lifetime": 60, "lastseen": now}
    response = await kube.patch(f"{PEERINGS}/alchemist", json={"status": {peer: record}})
    assert response.status == 200


async def test_a_replica_stands_by_while_a_higher_priority_one_works(
    kube: KubernetesEmulator, operator_config: OperatorConfig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kopf")
    peering = {
        "apiVersion": "kopf.dev/v1",
        "kind": "KopfPeering",
        "metadata": {"name": "alchemist", "namespace": NS},
    }
    assert (await kube.post(PEERINGS, json=peering)).status == 200
    await announce(kube, "replica-high", 20)
    replica = dataclasses.replace(operator_config, standalone=False, priority=10)

    # kopf starts paused until it has read the peering object; here it finds a higher priority and stays so.
    async with running_operator(replica, peer_id="replica-low"):
        await eventually(
            lambda: peers(kube) == {"replica-high": 20, "replica-low": 10}, what="its own record"
        )
        await kube.post(JOB_PATH, json=job_manifest(replicas=1))
        for _ in range(10):  # the job is the working replica's business
            await asyncio.sleep(0.1)
            assert not has_object(kube, "apps/v1/statefulsets", NS, "chat")

        # The working replica is gone: this one takes over and reconciles what is there.
        await announce(kube, "replica-high", None)
        await eventually(lambda: "Resuming operations after the pause" in caplog.text, what="taking over")
        await eventually(
            lambda: has_object(kube, "apps/v1/statefulsets", NS, "chat"), what="the job reconciled"
        )
