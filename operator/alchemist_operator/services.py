"""The job's two Services: a headless one that gives each replica a DNS name, and one that clients call."""

from __future__ import annotations

from typing import Any

from alchemist_operator.job_spec import JobSpec
from alchemist_operator.naming import GROUP, JobRef

CLIENT_PORT = 80
# Tells the two apart for scrapers: a ServiceMonitor selects the headless one, so each pod is scraped once.
SERVICE_ROLE_LABEL = f"{GROUP}/service"


def _metadata(job: JobRef, name: str, role: str) -> dict[str, Any]:
    meta = job.metadata(name)
    meta["labels"] = {**job.labels(), SERVICE_ROLE_LABEL: role}
    return meta


def build_headless_service(job: JobRef, spec: JobSpec) -> dict[str, Any]:
    """`<job>-N.<job>-headless` for each replica; not-ready pods are listed too, so peers find a starting pod."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, job.headless_service, "headless"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": job.selector_labels(),
            "ports": [{"name": "http", "port": spec.serving.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def build_client_service(job: JobRef, spec: JobSpec) -> dict[str, Any]:
    """The OpenAI-compatible endpoint: http://<job>.<namespace>.svc/v1, balanced over ready replicas."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, job.client_service, "client"),
        "spec": {
            "type": "ClusterIP",
            "selector": job.selector_labels(),
            "ports": [{"name": "http", "port": CLIENT_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
