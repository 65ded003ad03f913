"""Everything a job owns, built from its spec: ConfigMap, versions claim, StatefulSet, two Services, a
PodDisruptionBudget, and the Secret with the default Redis's password when the job uses that Redis.

Pure: `desired_children` returns manifests and touches no API. Each child carries the job as its controlling
owner, so Kubernetes deletes it with the job; only a versions claim the spec asks to retain has no owner.
"""

from __future__ import annotations

import base64
from typing import Any

from alchemist_operator.job_spec import JobSpec, VersionsStorage
from alchemist_operator.naming import JobRef
from alchemist_operator.operator_config import OperatorConfig
from alchemist_operator.services import build_client_service, build_headless_service
from alchemist_operator.statefulset import STATEFULSET_IMMUTABLE, build_statefulset
from alchemist_operator.versions_storage import shared_claim_spec
from alchemist_operator.worker_env import DEFAULT_PASSWORD_KEY, uses_default_redis, worker_config


def build_config_map(job: JobRef, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": job.metadata(job.config_map), "data": data}


# Spec fields the API server refuses to change after creation, per kind: they keep their live values.
IMMUTABLE_SPEC_FIELDS: dict[str, tuple[str, ...]] = {
    "StatefulSet": STATEFULSET_IMMUTABLE,
    "PersistentVolumeClaim": (
        "accessModes",
        "storageClassName",
        "volumeMode",
        "selector",
        "volumeName",
        "dataSource",
    ),
}


def build_versions_claim(job: JobRef, spec: JobSpec) -> dict[str, Any]:
    """The volume the trainer publishes versions to and every replica loads them from; survives suspend."""
    metadata = job.metadata(job.versions_claim)
    if spec.versions.retain_on_delete:
        del metadata["ownerReferences"]
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata,
        "spec": shared_claim_spec(spec),
    }


def build_disruption_budget(job: JobRef) -> dict[str, Any]:
    """Voluntary evictions (node drains) take one replica at a time, so serving never stops entirely."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": job.metadata(job.disruption_budget),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": job.selector_labels()}},
    }


def build_redis_secret(job: JobRef, password: str) -> dict[str, Any]:
    """The default Redis's password in the job's namespace: pods can only reference Secrets of their own."""
    encoded = base64.b64encode(password.encode()).decode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": job.metadata(job.redis_secret),
        "type": "Opaque",
        "data": {DEFAULT_PASSWORD_KEY: encoded},
    }


def desired_children(job: JobRef, spec: JobSpec, config: OperatorConfig) -> list[dict[str, Any]]:
    """In apply order: the ConfigMap, Secret and claim before the pods that use them, the Services before the
    pods."""
    data = worker_config(job, spec)
    image = spec.image or config.worker_image
    default_password = config.default_redis_password is not None
    children = [build_config_map(job, data)]
    if (
        config.default_redis_password is not None
        and spec.redis.password_secret is None
        and uses_default_redis(spec)
    ):
        children.append(build_redis_secret(job, config.default_redis_password))
    if spec.versions.storage is VersionsStorage.PERSISTENT_VOLUME_CLAIM:
        children.append(build_versions_claim(job, spec))
    children += [
        build_headless_service(job, spec),
        build_client_service(job, spec),
        build_statefulset(job, spec, image, data, config.default_redis_url, default_password),
        build_disruption_budget(job),
    ]
    return children
