"""The job's StatefulSet: one worker pod per replica, all sharing the job's versions volume.

A StatefulSet rather than a Deployment because replicas have stable names (`<job>-0`, `<job>-1`, ...): the
rollout pointer names canary replicas, and heartbeats and request records name the replica that served.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from alchemist_operator import live_config, pod_template
from alchemist_operator.evaluation_set import evaluation_volumes
from alchemist_operator.job_spec import JobSpec
from alchemist_operator.model_source import model_pod_parts
from alchemist_operator.naming import CONFIG_HASH_ANNOTATION, VERSIONS_DIR, WORKER_CONTAINER, JobRef
from alchemist_operator.versions_storage import (
    VERSIONS_VOLUME,
    claim_retention,
    claim_templates,
    versions_env,
    versions_volume,
)
from alchemist_operator.worker_env import ADMIN_KEYS_FILE, API_KEYS_FILE, pod_env

WORKER_UID = 1000
# Loading a large checkpoint can take many minutes; liveness starts counting only after the first success.
STARTUP_BUDGET_SECONDS = 1800

CONTAINER_SECURITY: dict[str, Any] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}

# Fields of a StatefulSet's spec that Kubernetes refuses to change after creation.
STATEFULSET_IMMUTABLE = ("selector", "serviceName", "volumeClaimTemplates", "podManagementPolicy")


def config_hash(config_data: dict[str, str], env: list[dict[str, Any]]) -> str:
    """Changes whenever the pods' configuration does, so that a change rolls the pods."""
    blob = json.dumps({"config": config_data, "env": env}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _resources(spec: JobSpec) -> dict[str, Any]:
    res = spec.resources
    requests: dict[str, Any] = {"cpu": str(res.cpu), "memory": str(res.memory)}
    limits: dict[str, Any] = {"memory": str(res.memory)}
    if res.gpus > 0:
        requests[res.gpu_resource] = res.gpus
        limits[res.gpu_resource] = res.gpus
    return {"requests": requests, "limits": limits}


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def _volumes(
    job: JobRef, spec: JobSpec, image: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(pod volumes, container mounts, init containers): versions (model_source.py, versions_storage.py),
    shared memory, the model unless it is in the image, and the API key Secrets when the job names them
    (read-only files, so keys never pass through the environment)."""
    versions = versions_volume(job, spec)
    volumes: list[dict[str, Any]] = [
        *([versions] if versions is not None else []),
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(spec.resources.shared_memory)}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": VERSIONS_VOLUME, "mountPath": VERSIONS_DIR},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    model_volumes, model_mounts, init_containers = model_pod_parts(spec, image, CONTAINER_SECURITY)
    volumes += model_volumes
    mounts += model_mounts
    for name, ref, path in (
        ("api-keys", spec.auth.api_keys_secret, API_KEYS_FILE),
        ("admin-keys", spec.auth.admin_keys_secret, ADMIN_KEYS_FILE),
    ):
        if ref is None:
            continue
        directory, file = path.rsplit("/", 1)
        volumes.append(
            {
                "name": name,
                "secret": {
                    "secretName": ref.name,
                    "items": [{"key": ref.key, "path": file}],
                    "defaultMode": 0o440,
                },
            }
        )
        mounts.append({"name": name, "mountPath": directory, "readOnly": True})
    evaluation_vols, evaluation_mounts = evaluation_volumes(spec)
    volumes += evaluation_vols
    mounts += evaluation_mounts
    return volumes, mounts, init_containers


def build_statefulset(
    job: JobRef,
    spec: JobSpec,
    image: str,
    config_data: dict[str, str],
    default_redis_url: str | None,
    default_password: bool = False,
) -> dict[str, Any]:
    env = pod_env(job, spec, default_redis_url, default_password) + versions_env(spec)
    volumes, mounts, init_containers = _volumes(job, spec, image)
    container: dict[str, Any] = {
        "name": WORKER_CONTAINER,
        "image": image,
        "imagePullPolicy": spec.image_pull_policy.value,
        "command": ["alchemist-worker"],
        "args": ["serve"],
        "ports": [{"name": "http", "containerPort": spec.serving.port, "protocol": "TCP"}],
        "envFrom": [{"configMapRef": {"name": job.config_map}}],
        "env": env,
        "resources": _resources(spec),
        "startupProbe": _probe("/healthz", 10, STARTUP_BUDGET_SECONDS // 10),
        "livenessProbe": _probe("/healthz", 10, 3),
        "readinessProbe": _probe("/readyz", 5, 3),
        "volumeMounts": mounts,
        # A worker that exits on start (a model path that does not exist, a bad setting) leaves its last log
        # lines as the termination message, which the operator reports in the job's status and Events.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": CONTAINER_SECURITY,
    }
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,  # workers talk to Redis, never to the Kubernetes API
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": WORKER_UID,
            "runAsGroup": WORKER_UID,
            "fsGroup": WORKER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if init_containers:
        pod_spec["initContainers"] = init_containers
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    if spec.resources.node_selector:
        pod_spec["nodeSelector"] = dict(spec.resources.node_selector)
    if spec.resources.tolerations:
        pod_spec["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in spec.resources.tolerations
        ]
    manifest: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": job.metadata(job.statefulset),
        "spec": {
            "replicas": 0 if spec.suspend else spec.replicas,
            "serviceName": job.headless_service,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": job.selector_labels()},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}},
            "template": {
                "metadata": {
                    "labels": job.labels(),
                    "annotations": {
                        CONFIG_HASH_ANNOTATION: config_hash(live_config.restart_config(config_data), env),
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(spec.serving.port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }
    templates = claim_templates(job, spec)
    if templates:
        manifest["spec"]["volumeClaimTemplates"] = templates
        manifest["spec"]["persistentVolumeClaimRetentionPolicy"] = claim_retention(spec)
    manifest["spec"]["template"] = pod_template.with_pod_options(job, spec, manifest["spec"]["template"])
    return manifest
