"""What the Kubernetes API knows about a job: its spec and the status the operator wrote, and its worker pods.

Read with the person's own kubeconfig (or the pod's service account inside a cluster). Anything that fails (no
kubeconfig, an unreachable server, no permission, no such job) becomes the view's `error`, so `alchemist status`
still shows what Redis knows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

GROUP, VERSION, PLURAL = "alchemist.dev", "v1alpha1", "continuallearningjobs"
REQUEST_TIMEOUT_S = 10  # a person is waiting: an unreachable API server is reported, not waited on


@dataclass(frozen=True)
class PodView:
    name: str
    phase: str
    ready: bool
    restarts: int


@dataclass(frozen=True)
class KubeView:
    job: dict[str, Any] | None = None
    pods: tuple[PodView, ...] = ()
    error: str = ""

    @property
    def spec(self) -> dict[str, Any]:
        return dict((self.job or {}).get("spec") or {})

    @property
    def status(self) -> dict[str, Any]:
        return dict((self.job or {}).get("status") or {})


def api_client() -> client.ApiClient:
    """From the kubeconfig (KUBECONFIG or ~/.kube/config), else the in-cluster service account."""
    try:
        config.load_kube_config()
    except (ConfigException, FileNotFoundError, TypeError):
        config.load_incluster_config()
    return client.ApiClient()


def pod_view(pod: dict[str, Any]) -> PodView:
    status = pod.get("status") or {}
    containers = status.get("containerStatuses") or []
    return PodView(
        name=pod["metadata"]["name"],
        phase=status.get("phase", "Unknown"),
        ready=bool(containers) and all(c.get("ready") for c in containers),
        restarts=sum(int(c.get("restartCount") or 0) for c in containers),
    )


def read_kube_view(namespace: str, name: str) -> KubeView:
    try:
        api = api_client()
    except ConfigException as exc:
        return KubeView(error=f"no Kubernetes configuration: {exc}")
    with api:
        try:
            job: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(  # type: ignore[assignment]
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=REQUEST_TIMEOUT_S
            )
        except ApiException as exc:
            if exc.status == 404:
                return KubeView(error=f"no ContinualLearningJob {name!r} in namespace {namespace!r}")
            return KubeView(error=f"the Kubernetes API answered {exc.status} {exc.reason}")
        except Exception as exc:  # connection refused, DNS, TLS: the API is not reachable from here
            return KubeView(error=f"the Kubernetes API is unreachable: {exc}")
        selector = (job.get("status") or {}).get("selector") or f"{GROUP}/job={name}"
        try:
            # As JSON, not the client's models: they refuse a pod status missing a field they require.
            raw: Any = client.CoreV1Api(api).list_namespaced_pod(
                namespace, label_selector=selector, _preload_content=False, _request_timeout=REQUEST_TIMEOUT_S
            )
            items = json.loads(raw.data).get("items") or []
        except Exception as exc:  # the job is shown without its pods
            return KubeView(job=job, error=f"pods not readable: {exc}")
    return KubeView(job=job, pods=tuple(sorted((pod_view(p) for p in items), key=lambda p: p.name)))
