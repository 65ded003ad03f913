"""Everything a job owns, built from its spec: ConfigMap, StatefulSet, two Services, PodDisruptionBudget.

Pure: `desired_children` returns manifests and touches no API. Each child carries the job as its controlling
owner, so Kubernetes deletes it with the job.
"""

from __future__ import annotations

from typing import Any

from alchemist_operator.job_spec import JobSpec
from alchemist_operator.naming import JobRef
from alchemist_operator.operator_config import OperatorConfig
from alchemist_operator.services import build_client_service, build_headless_service
from alchemist_operator.statefulset import build_statefulset
from alchemist_operator.worker_env import worker_config


def build_config_map(job: JobRef, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": job.metadata(job.config_map), "data": data}


def build_disruption_budget(job: JobRef) -> dict[str, Any]:
    """Voluntary evictions (node drains) take one replica at a time, so serving never stops entirely."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": job.metadata(job.disruption_budget),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": job.selector_labels()}},
    }


def desired_children(job: JobRef, spec: JobSpec, config: OperatorConfig) -> list[dict[str, Any]]:
    """In apply order: the ConfigMap before the pods that load it, the Services before the pods they name."""
    data = worker_config(job, spec)
    image = spec.image or config.worker_image
    return [
        build_config_map(job, data),
        build_headless_service(job, spec),
        build_client_service(job, spec),
        build_statefulset(job, spec, image, data, config.default_redis_url),
        build_disruption_budget(job),
    ]
