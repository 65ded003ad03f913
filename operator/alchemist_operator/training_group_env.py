"""How a job's replicas train as one data-parallel group: the workers' settings for it.

Every worker of a training job trains (worker/alchemist_worker/distributed/): the trainer-lease holder leads
the group and hosts torch's rendezvous store on `DP_PORT`, and the others reach it through its stable pod
name in the headless Service (`<pod>.<job>-headless.<namespace>.svc`). Ranks and the world size are not set
here: they change with every generation (a replica joins, leaves or dies) and the leader writes them to Redis.
So the settings do not depend on `replicas`: scaling the StatefulSet changes no pod template (no rollout), and
the group re-forms with the pods that come or go. One replica is a group of one.
"""

from __future__ import annotations

from alchemist_operator.job_spec import JobSpec
from alchemist_operator.naming import JobRef

DP_PORT = 29500


def data_parallel(spec: JobSpec) -> bool:
    return spec.training.enabled


def data_parallel_config(spec: JobSpec) -> dict[str, str]:
    """ConfigMap entries (the same for every pod)."""
    if not data_parallel(spec):
        return {}
    return {"ALCHEMIST_DATA_PARALLEL": "true", "ALCHEMIST_DP_PORT": str(DP_PORT)}


def data_parallel_pod_env(job: JobRef, spec: JobSpec) -> list[dict[str, object]]:
    """Per-pod: the address the others reach this pod at, built by Kubernetes from the pod's own name and
    namespace (declared before it in the container's env)."""
    if not data_parallel(spec):
        return []
    address = f"$(ALCHEMIST_REPLICA).{job.headless_service}.$(ALCHEMIST_NAMESPACE).svc"
    return [{"name": "ALCHEMIST_DP_ADDRESS", "value": address}]
