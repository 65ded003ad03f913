"""The API layer against kmock: apply is idempotent, 404 and 409 are the expected cases, immutable fields hold."""

from __future__ import annotations

import base64
import socket
import threading
import time
from typing import Any

import kubernetes
import pytest
from alchemist_operator.children import IMMUTABLE_SPEC_FIELDS, desired_children
from alchemist_operator.cluster_api import ApiError, ClusterApi, is_subset, resource_path
from alchemist_operator.job_spec import parse_job_spec
from alchemist_operator.naming import JobRef
from alchemist_operator.operator_config import OperatorConfig
from kmock import KubernetesEmulator

from tests.operator.conftest import JOBS, job_manifest

JOB = JobRef("ns", "chat", "uid-1")
CONFIG = OperatorConfig(default_redis_url="redis://r:6379/0")


def config_map(**data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "c", "namespace": "ns"},
        "data": data,
    }


def calls(kube: KubernetesEmulator) -> list[str]:
    return [f"{r.method.value} {r.url.path}" for r in kube]


@pytest.fixture
def api(kube: KubernetesEmulator) -> ClusterApi:
    return ClusterApi.from_environment()


async def test_apply_creates_then_updates(kube: KubernetesEmulator, api: ClusterApi) -> None:
    first = await api.apply(config_map(a="1"))
    assert first.created and kube.objects["v1/configmaps", "ns", "c"]["data"] == {"a": "1"}
    second = await api.apply(config_map(a="2"))
    assert not second.created and kube.objects["v1/configmaps", "ns", "c"]["data"] == {"a": "2"}
    # Server-side apply, with the operator as field manager, forcing ownership.
    patches = [r for r in kube if r.method.value == "PATCH"]
    assert patches[-1].headers["Content-Type"] == "application/apply-patch+yaml"
    assert patches[-1].params == {"fieldManager": "alchemist-operator", "force": "true"}


async def test_apply_survives_a_create_race(kube: KubernetesEmulator, api: ClusterApi) -> None:
    """404 on apply, then 409 on create (someone else created it): apply again, and it lands."""
    kube.objects["v1/configmaps", "ns", "c"] = config_map(a="0")
    kube["patch /api/v1/namespaces/ns/configmaps/c"][:1] << 404
    result = await api.apply(config_map(a="1"))
    assert not result.created
    assert calls(kube) == [
        "PATCH /api/v1/namespaces/ns/configmaps/c",
        "POST /api/v1/namespaces/ns/configmaps",
        "PATCH /api/v1/namespaces/ns/configmaps/c",
    ]


async def test_other_errors_are_raised(kube: KubernetesEmulator, api: ClusterApi) -> None:
    kube.objects["v1/configmaps", "ns", "c"] = config_map(a="0")
    kube["patch /api/v1/namespaces/ns/configmaps/c"] << 500
    with pytest.raises(ApiError) as err:
        await api.apply(config_map(a="1"))
    assert err.value.status == 500


async def test_missing_objects_read_as_none_and_status_of_a_gone_job_is_skipped(
    kube: KubernetesEmulator, api: ClusterApi
) -> None:
    assert await api.get("apps/v1", "StatefulSet", "ns", "nope") is None
    assert await api.patch_status("ns", "gone", {"phase": "Running"}) is False
    kube.objects[JOBS, "ns", "chat"] = job_manifest(namespace="ns")
    assert await api.patch_status("ns", "chat", {"phase": "Running"}) is True
    assert kube.objects[JOBS, "ns", "chat"]["status"] == {"phase": "Running"}


async def test_immutable_fields_keep_their_live_values(kube: KubernetesEmulator, api: ClusterApi) -> None:
    def claim(access_mode: str, size: str) -> dict[str, Any]:
        spec = parse_job_spec(
            {
                "model": {"path": "/m"},
                "versions": {"storage": "PersistentVolumeClaim", "accessMode": access_mode, "size": size},
            }
        )
        return next(m for m in desired_children(JOB, spec, CONFIG) if m["kind"] == "PersistentVolumeClaim")

    immutable = IMMUTABLE_SPEC_FIELDS["PersistentVolumeClaim"]
    await api.apply(claim("ReadWriteMany", "20Gi"), immutable=immutable)
    result = await api.apply(claim("ReadWriteOnce", "50Gi"), immutable=immutable)
    assert result.kept_fields == ("accessModes",)
    live = kube.objects["v1/persistentvolumeclaims", "ns", "chat-versions"]
    assert live["spec"]["resources"]["requests"]["storage"] == "50Gi"  # claims may grow
    assert live["spec"]["accessModes"] == ["ReadWriteMany"]
    # Unchanged immutable fields are no news.
    again = await api.apply(claim("ReadWriteMany", "50Gi"), immutable=immutable)
    assert again.kept_fields == ()


async def test_secret_values_are_decoded(kube: KubernetesEmulator, api: ClusterApi) -> None:
    encoded = base64.b64encode(b"redis://secret:6379/0").decode()
    kube.objects["v1/secrets", "ns", "redis"] = {
        "metadata": {"name": "redis", "namespace": "ns"},
        "data": {"url": encoded},
    }
    assert await api.secret_value("ns", "redis", "url") == "redis://secret:6379/0"
    assert await api.secret_value("ns", "redis", "other") is None
    assert await api.secret_value("ns", "missing", "url") is None


def test_paths_and_subset() -> None:
    assert resource_path("v1", "Service", "ns", "a") == "/api/v1/namespaces/ns/services/a"
    assert (
        resource_path("policy/v1", "PodDisruptionBudget", "ns")
        == "/apis/policy/v1/namespaces/ns/poddisruptionbudgets"
    )
    with pytest.raises(ValueError, match="does not manage Deployment"):
        resource_path("apps/v1", "Deployment", "ns")
    # The server adds defaults: what we set must be there, extra fields are fine.
    assert is_subset({"a": [{"b": 1}]}, {"a": [{"b": 1, "c": 2}], "d": 3})
    assert not is_subset({"a": [{"b": 1}]}, {"a": [{"b": 2}]})
    assert is_subset({"size": 5}, {"size": "5"})


async def test_an_api_server_that_never_answers_fails_the_call_instead_of_hanging() -> None:
    """A connection accepted but never answered (a wedged API server or proxy) must not hold the handler's
    thread forever: the read timeout fails the call, and kopf retries the handler."""
    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    accepting = threading.Thread(target=lambda: held.append(silent.accept()[0]), daemon=True)
    accepting.start()
    configuration = kubernetes.client.Configuration()
    configuration.host = f"http://127.0.0.1:{silent.getsockname()[1]}"
    configuration.retries = 0
    api = ClusterApi(kubernetes.client.ApiClient(configuration), request_timeout=(1.0, 1.0))
    started = time.monotonic()
    try:
        with pytest.raises(Exception, match=r"(?i)timed out|timeout"):
            await api.get("v1", "ConfigMap", "ns", "c")
        assert time.monotonic() - started < 10
    finally:
        api.close()
        for connection in held:
            connection.close()
        silent.close()
