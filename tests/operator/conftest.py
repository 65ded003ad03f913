"""Fixtures for the operator: a kmock Kubernetes API that knows the CRD, kubeconfig pointing at it, and a
runner that starts the real kopf operator (standalone, scanning off) inside a test body."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from alchemist_operator.cli import run
from alchemist_operator.naming import API_VERSION, GROUP, KIND, PLURAL, VERSION
from alchemist_operator.operator_config import OperatorConfig
from kmock import KubernetesEmulator, ResourceInfo

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "continuallearningjobs.alchemist.dev.yaml"
JOBS = f"{GROUP}/{VERSION}/{PLURAL}"


@pytest.fixture(scope="session")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def register_resources(server: KubernetesEmulator) -> None:
    """Built-in kinds, the job CRD (with its subresources) and kopf's peering kinds."""
    server.resources.load_bundled()
    server.resources[JOBS] = ResourceInfo(
        kind=KIND,
        singular="continuallearningjob",
        namespaced=True,
        shortnames={"clj"},
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
        subresources={"status", "scale"},
    )
    server.resources["kopf.dev/v1/kopfpeerings"] = ResourceInfo(
        kind="KopfPeering", singular="kopfpeering", namespaced=True, verbs={"get", "list", "watch", "patch"}
    )


@pytest.fixture
def kube(kmock: KubernetesEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KubernetesEmulator:
    """kmock with our resources; the kubernetes client and kopf both reach it through a kubeconfig file."""
    register_resources(kmock)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
                "users": [{"name": "test", "user": {"token": "test-token"}}],
                "contexts": [
                    {"name": "kmock", "context": {"cluster": "kmock", "user": "test", "namespace": "default"}}
                ],
                "current-context": "kmock",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    return kmock


def job_manifest(name: str = "chat", namespace: str = "team-a", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "generation": 1,
            "resourceVersion": "1",
        },
        "spec": {"model": {"path": "/models/smollm2"}, **spec},
    }
    return body


def has_object(kube: KubernetesEmulator, resource: str, namespace: str, name: str) -> bool:
    """Whether kmock holds the object and it is not deleted (`in` would need a parsed resource key)."""
    try:
        return not kube.objects[resource, namespace, name].deleted
    except KeyError:
        return False


async def set_ready(
    kube: KubernetesEmulator, replicas: int, ready: int, name: str = "chat", namespace: str = "team-a"
) -> None:
    """What the StatefulSet controller reports once the pods pass their readiness probes (kmock has none)."""
    body = {"status": {"replicas": replicas, "readyReplicas": ready, "updatedReplicas": replicas}}
    await eventually(
        lambda: has_object(kube, "apps/v1/statefulsets", namespace, name), what="the StatefulSet"
    )
    response = await kube.patch(f"/apis/apps/v1/namespaces/{namespace}/statefulsets/{name}/status", json=body)
    assert response.status == 200, await response.text()


@contextlib.asynccontextmanager
async def running_operator(
    config: OperatorConfig, peer_id: str | None = None
) -> AsyncIterator[asyncio.Task[None]]:
    """The real operator (handlers, daemon, kopf machinery) against kmock, until the block ends.

    Cancelled rather than stopped by its stop flag: a graceful stop waits out kopf's 5 s idle timeout.
    """
    task = asyncio.create_task(run(config, peer_id=peer_id))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def eventually(
    probe: Callable[[], Any | Awaitable[Any]], timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Polls until `probe` returns something truthy (and returns it), or fails with the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
            if asyncio.iscoroutine(last):
                last = await last
        except (KeyError, LookupError) as exc:
            last = exc
        else:
            if last:
                return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or probe}; last: {last!r}")


@pytest.fixture
def operator_config(redis_url: str) -> OperatorConfig:
    return OperatorConfig(
        worker_image="alchemist/worker:test",
        default_redis_url=redis_url,
        monitor_interval_seconds=0.2,
        namespaces=("team-a",),
        standalone=True,
        liveness_endpoint=None,
    )


@pytest.fixture
def no_redis_config() -> Iterator[OperatorConfig]:
    yield OperatorConfig(
        worker_image="alchemist/worker:test",
        monitor_interval_seconds=0.2,
        namespaces=("team-a",),
        standalone=True,
        liveness_endpoint=None,
    )
