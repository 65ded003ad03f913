"""What a job adds to its worker pods beyond serving a model: scheduling, identity, extra volumes, and how the
pods stop.

Pure. `with_pod_options` takes the pod template `build_statefulset` made and returns it with the job's
`spec.pod` passed through (labels, annotations, affinity, topology spread, priority and runtime classes, image pull
Secrets, extra volumes and mounts), the stop sequence of `spec.lifecycle`, and the torch thread count (unless
`spec.env` sets those variables itself). Without `spec.pod.topologySpreadConstraints` the replicas spread across nodes where the
scheduler can (`ScheduleAnyway`): one node's failure then takes one replica, not all of them.

Stopping: Kubernetes runs the preStop hook (a sleep, so that the Service's endpoints drop the pod before it
stops admitting), then sends SIGTERM; the worker refuses new requests, lets in-flight generations run for up to
`drainSeconds`, aborts the rest, flushes open responses and exits. The grace period covers all of it.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from alchemist_operator.job_spec import JobSpec
from alchemist_operator.naming import CONFIG_HASH_ANNOTATION, VERSIONS_DIR, WORKER_CONTAINER, JobRef
from alchemist_operator.quantities import parse_quantity
from alchemist_operator.worker_env import AUTH_DIR

# After the drain: uvicorn flushes open responses (5 s), then the trainer, engine loop and request records stop.
SHUTDOWN_MARGIN_SECONDS = 15
NODE_TOPOLOGY_KEY = "kubernetes.io/hostname"
# Pod volumes the operator itself may create (versions, shared memory, the model, API key Secrets).
RESERVED_VOLUMES = frozenset({"versions", "dshm", "model", "api-keys", "admin-keys"})
RESERVED_LABELS = frozenset(JobRef("-", "-", "").labels())


def grace_period_seconds(spec: JobSpec) -> int:
    lifecycle = spec.lifecycle
    return lifecycle.pre_stop_seconds + lifecycle.drain_seconds + SHUTDOWN_MARGIN_SECONDS


def default_spread(job: JobRef) -> list[dict[str, Any]]:
    return [
        {
            "maxSkew": 1,
            "topologyKey": NODE_TOPOLOGY_KEY,
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": job.selector_labels()},
        }
    ]


def thread_env(spec: JobSpec) -> list[dict[str, Any]]:
    """Torch's thread count (the native engine sets it; vLLM's CPU build passes it on as OMP_NUM_THREADS): the CPU
    limit rounded up (Kubernetes rounds `limits.cpu` up with divisor 1), else the CPU request rounded up. Without
    it torch starts one thread per core of the node, which oversubscribes the pod's share of a shared node."""
    if spec.resources.cpu_limit is not None:
        source = {
            "resourceFieldRef": {"containerName": WORKER_CONTAINER, "resource": "limits.cpu", "divisor": "1"}
        }
        return [{"name": "ALCHEMIST_CPU_THREADS", "valueFrom": source}]
    threads = max(1, math.ceil(parse_quantity(spec.resources.cpu)))
    return [{"name": "ALCHEMIST_CPU_THREADS", "value": str(threads)}]


def lifecycle_env(spec: JobSpec) -> list[dict[str, Any]]:
    return [{"name": "ALCHEMIST_SHUTDOWN_TIMEOUT_S", "value": str(spec.lifecycle.drain_seconds)}]


def with_pod_options(job: JobRef, spec: JobSpec, template: dict[str, Any]) -> dict[str, Any]:
    """`template` (a StatefulSet's spec.template) with the job's pod options and stop sequence; a new dict."""
    out = copy.deepcopy(template)
    meta, pod = out["metadata"], out["spec"]
    options = spec.pod
    meta["labels"] = {**options.labels, **meta["labels"]}  # the operator's labels select the pods: they win
    meta["annotations"] = {**options.annotations, **meta["annotations"]}
    container = next(c for c in pod["containers"] if c["name"] == WORKER_CONTAINER)
    own = [var.model_dump(by_alias=True, exclude_none=True) for var in spec.env]
    added = [
        var
        for var in (*thread_env(spec), *lifecycle_env(spec))
        if var["name"] not in {v["name"] for v in own}
    ]
    container["env"] = _before_own_env(container["env"], added, own)
    if spec.resources.cpu_limit is not None:
        container["resources"]["limits"]["cpu"] = str(spec.resources.cpu_limit)
    if options.volume_mounts:
        container["volumeMounts"] = [*container["volumeMounts"], *copy.deepcopy(options.volume_mounts)]
    if spec.lifecycle.pre_stop_seconds:
        seconds = str(spec.lifecycle.pre_stop_seconds)
        container["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", seconds]}}}
    pod["terminationGracePeriodSeconds"] = grace_period_seconds(spec)
    if options.volumes:
        pod["volumes"] = [*pod["volumes"], *copy.deepcopy(options.volumes)]
    spread = options.topology_spread_constraints
    spread = default_spread(job) if spread is None else copy.deepcopy(spread)
    if spread:
        pod["topologySpreadConstraints"] = spread
    if options.affinity:
        pod["affinity"] = copy.deepcopy(options.affinity)
    if options.priority_class_name:
        pod["priorityClassName"] = options.priority_class_name
    if options.runtime_class_name:
        pod["runtimeClassName"] = options.runtime_class_name
    if options.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": ref.name} for ref in options.image_pull_secrets]
    return out


def _before_own_env(
    env: list[dict[str, Any]], added: list[dict[str, Any]], own: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """`added` just before the job's own `spec.env`, so that its values may refer to ours as $(NAME)."""
    for start in range(len(env) - len(own) + 1):
        if own and env[start : start + len(own)] == own:
            return [*env[:start], *added, *env[start:]]
    return [*env, *added]


def pod_options_problems(spec: JobSpec) -> list[str]:
    """What in `spec.pod` would clash with what the operator sets, or cannot be a Kubernetes object."""
    options = spec.pod
    problems: list[str] = []
    limit = spec.resources.cpu_limit
    if limit is not None and parse_quantity(limit) < parse_quantity(spec.resources.cpu):
        problems.append(
            f"spec.resources.cpuLimit ({limit}) must be at least spec.resources.cpu ({spec.resources.cpu})"
        )
    if clash := sorted(RESERVED_LABELS & set(options.labels)):
        problems.append(
            f"spec.pod.labels must not set {', '.join(clash)}: the operator selects its pods by them"
        )
    if CONFIG_HASH_ANNOTATION in options.annotations:
        problems.append(f"spec.pod.annotations must not set {CONFIG_HASH_ANNOTATION}: the operator sets it")
    names = [v.get("name") for v in options.volumes]
    if any(not isinstance(n, str) or not n for n in names):
        problems.append("spec.pod.volumes: every volume needs a name")
    if clash := sorted(RESERVED_VOLUMES & {n for n in names if isinstance(n, str)}):
        problems.append(
            f"spec.pod.volumes must not be named {', '.join(clash)}: the operator uses those names"
        )
    if duplicates := sorted({n for n in names if isinstance(n, str) and names.count(n) > 1}):
        problems.append(f"spec.pod.volumes names {', '.join(duplicates)} more than once")
    known = set(names)
    taken = {VERSIONS_DIR, "/dev/shm", spec.model.mount_path}
    for mount in options.volume_mounts:
        name, path = mount.get("name"), mount.get("mountPath")
        if name not in known:
            problems.append(f"spec.pod.volumeMounts: {name!r} is not one of spec.pod.volumes")
        if not isinstance(path, str) or not path.startswith("/"):
            problems.append(f"spec.pod.volumeMounts: {name!r} needs an absolute mountPath")
        elif path.rstrip("/") in taken or path.startswith(AUTH_DIR):
            problems.append(f"spec.pod.volumeMounts: {path} is where the operator mounts its own volumes")
    return problems
