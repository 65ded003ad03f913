"""End to end: the chart's objects and the CPU example applied with kubectl to kmock, the operator configured as
the chart's Deployment configures it, a replica simulated by its pod and its heartbeats in a real Redis, and the
job read back through `alchemist status`."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from alchemist_cli.main import main
from alchemist_operator.cli import config_from_args, run
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.schemas import ArtifactKind, ReplicaState, VersionInfo
from kmock import KubernetesEmulator, ResourceInfo

from tests.charts.conftest import EXAMPLES, Render
from tests.charts.test_chart import operator_deployment
from tests.operator.conftest import JOBS, eventually, set_ready

NS, NAME = "default", "smollm2"


async def kubectl_apply(kubectl: Path, manifests: str, tmp_path: Path) -> list[str]:
    process = await asyncio.create_subprocess_exec(
        str(kubectl), "apply", "--validate=false", "-f", "-",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"KUBECONFIG": os.environ["KUBECONFIG"], "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(manifests.encode()), timeout=120)
    assert process.returncode == 0, err.decode() + out.decode()
    return out.decode().splitlines()


@contextlib.asynccontextmanager
async def replica(store: JobStore) -> AsyncIterator[None]:
    """What the worker of pod smollm2-0 does: serve what the rollout pointer names and say so in its heartbeat."""

    async def beat() -> None:
        while True:
            wanted = store.get_rollout().version_for(f"{NAME}-0") if store.has_rollout() else 0
            state = ReplicaState(replica=f"{NAME}-0", loaded_version=wanted, ready=True)
            store.report_replica(state, ttl_seconds=5)
            await asyncio.sleep(0.05)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def pod(labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{NAME}-0", "namespace": NS, "labels": labels},
        "spec": {"containers": [{"name": "worker", "image": "alchemist/worker:0.1.0"}]},
        "status": {
            "phase": "Running",
            "containerStatuses": [{"name": "worker", "ready": True, "restartCount": 2}],
        },
    }


@pytest.mark.slow
async def test_chart_and_example_in_kmock_read_back_through_alchemist_status(
    kube: KubernetesEmulator,
    kubectl: Path,
    render: Render,
    redis_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # kubectl reads the discovery documents: kmock 0.8 names the core group version "/v1", kubectl expects "v1".
    core = await (await kube.get("/api/v1")).json()
    core["groupVersion"] = "v1"
    kube["get /api/v1"] << core
    kube.resources["kopf.dev/v1/clusterkopfpeerings"] = ResourceInfo(
        kind="ClusterKopfPeering",
        singular="clusterkopfpeering",
        namespaced=False,
        verbs={"get", "list", "create"},
    )
    chart = render({"redis": {"enabled": False, "externalUrl": redis_url}, "monitorIntervalSeconds": 0.2})
    applied = await kubectl_apply(kubectl, yaml.safe_dump_all(chart), tmp_path)
    assert len(applied) == len(chart) and all(line.endswith(" created") for line in applied), applied
    example = (EXAMPLES / "cpu-smollm2.yaml").read_text()
    assert await kubectl_apply(kubectl, example, tmp_path) == [
        "continuallearningjob.alchemist.dev/smollm2 created"
    ]
    # What a real API server adds on create and kmock 0.8 does not (kopf's patches test the resourceVersion).
    path = f"/apis/alchemist.dev/v1alpha1/namespaces/{NS}/continuallearningjobs/{NAME}"
    server_fields = {"uid": f"uid-{NAME}", "generation": 1, "resourceVersion": "1"}
    assert (await kube.patch(path, json={"metadata": server_fields})).status == 200

    # The operator with the arguments and environment of the chart's Deployment (one replica, no peering).
    (container,) = operator_deployment(chart)["spec"]["template"]["spec"]["containers"]
    environ = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    config, _ = config_from_args(
        [*container["args"], "--standalone", "--liveness=", f"--namespace={NS}"], environ
    )
    store = JobStore.from_url(redis_url, NS, NAME)
    task = asyncio.create_task(run(config))
    try:
        async with replica(store):
            sts = await eventually(lambda: kube.objects["apps/v1/statefulsets", NS, NAME], what="StatefulSet")
            labels = {str(k): str(v) for k, v in sts["spec"]["template"]["metadata"]["labels"].items()}
            assert (await kube.post(f"/api/v1/namespaces/{NS}/pods", json=pod(labels))).status == 200
            await set_ready(kube, 1, 1, name=NAME, namespace=NS)
            store.publish_version(
                VersionInfo(
                    version=1, parent=0, kind=ArtifactKind.LORA, path="/v/1", loss=0.731, samples=4,
                    training={"reused": 3, "recomputed": 1}, trained_by=f"{NAME}-0",
                )
            )  # fmt: skip
            await eventually(
                lambda: kube.objects[JOBS, NS, NAME]["status"].get("replicaVersions") == {f"{NAME}-0": 1},
                what="version 1 served",
            )
            await eventually(lambda: kube.objects[JOBS, NS, NAME]["status"].get("phase") == "Running")
            argv = ["status", NAME, "-n", NS, "--redis-url", redis_url]
            code = await asyncio.to_thread(main, argv, {})
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        store.close()
    out = capsys.readouterr().out
    assert code == 0, out
    assert "default/smollm2  phase Running, 1/1 replicas ready, newest version 1" in out
    assert "Kubernetes:" not in out and "Redis:" not in out  # both were read
    assert "│ Ready " in out and "ReplicasReady" in out
    assert "Immediate" in out
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if cells[0] == "1" and len(cells) > 7:
            assert cells[:8] == ["1", "0", "stable", "4", "0.7310", "3", "1", "0"]
        if cells[0] == f"{NAME}-0":
            assert cells[1:4] == ["1", "1", "yes"] and cells[6:8] == ["Running", "2"]
    assert f"│ {NAME}-0 " in out and "│ 0.7310 " in out
