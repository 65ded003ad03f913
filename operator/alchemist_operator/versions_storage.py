"""Where published versions live, per `spec.versions.storage`, and how the pods reach them.

- `PerReplica` (default): each pod gets its own ReadWriteOnce claim from the StatefulSet's volumeClaimTemplates,
  which any StorageClass can bind (a single-node local-path class included). The trainer writes versions to its
  own claim; a replica that lacks one copies it over HTTP from the replica that published it (or any replica
  that has it), through the headless Service, into its own claim. Versions outlive pod restarts and suspend.
- `PersistentVolumeClaim`: one claim that every pod mounts: ReadWriteMany (a class that supports it) when
  replicas run on several nodes; ReadWriteOnce works only while they share a node.
- `S3`: versions are uploaded to `spec.versions.uri` before they are published; pods keep what they load in an
  emptyDir. Any replica can take over training without the publisher being alive.
- `EmptyDir`: one replica, versions lost with the pod (trials).

Pure: fragments of the StatefulSet and ConfigMap, no API.
"""

from __future__ import annotations

from typing import Any

from alchemist_operator.job_spec import AccessMode, JobSpec, VersionsStorage
from alchemist_operator.model_source import s3_env
from alchemist_operator.naming import JobRef

VERSIONS_VOLUME = "versions"


def shared_access_mode(spec: JobSpec) -> AccessMode:
    return spec.versions.access_mode or AccessMode.READ_WRITE_MANY


def _claim_spec(spec: JobSpec, access_mode: AccessMode) -> dict[str, Any]:
    claim: dict[str, Any] = {
        "accessModes": [access_mode.value],
        "resources": {"requests": {"storage": str(spec.versions.size)}},
    }
    if spec.versions.storage_class_name:
        claim["storageClassName"] = spec.versions.storage_class_name
    return claim


def shared_claim_spec(spec: JobSpec) -> dict[str, Any]:
    """The spec of the one claim of `PersistentVolumeClaim` storage."""
    return _claim_spec(spec, shared_access_mode(spec))


def versions_volume(job: JobRef, spec: JobSpec) -> dict[str, Any] | None:
    """The pod volume holding the versions directory; None when each pod's claim comes from a template."""
    storage = spec.versions.storage
    if storage is VersionsStorage.PER_REPLICA:
        return None
    if storage is VersionsStorage.PERSISTENT_VOLUME_CLAIM:
        return {"name": VERSIONS_VOLUME, "persistentVolumeClaim": {"claimName": job.versions_claim}}
    return {"name": VERSIONS_VOLUME, "emptyDir": {"sizeLimit": str(spec.versions.size)}}


def claim_templates(job: JobRef, spec: JobSpec) -> list[dict[str, Any]]:
    """The StatefulSet's volumeClaimTemplates: one ReadWriteOnce claim per pod for `PerReplica` storage."""
    if spec.versions.storage is not VersionsStorage.PER_REPLICA:
        return []
    access = spec.versions.access_mode or AccessMode.READ_WRITE_ONCE
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": VERSIONS_VOLUME, "labels": job.labels()},
            "spec": _claim_spec(spec, access),
        }
    ]


def claim_retention(spec: JobSpec) -> dict[str, str] | None:
    """Per-pod claims go with the job unless it asks to keep them; scaling down always keeps them."""
    if spec.versions.storage is not VersionsStorage.PER_REPLICA:
        return None
    return {"whenDeleted": "Retain" if spec.versions.retain_on_delete else "Delete", "whenScaled": "Retain"}


def peer_url_template(job: JobRef, spec: JobSpec) -> str:
    """Each replica's address through the headless Service; the worker fills in `{replica}`."""
    return f"http://{{replica}}.{job.headless_service}.{job.namespace}.svc:{spec.serving.port}"


def versions_config(job: JobRef, spec: JobSpec) -> dict[str, str]:
    """The worker's ConfigMap entries that say where versions come from besides its own directory."""
    storage = spec.versions.storage
    if storage is VersionsStorage.PER_REPLICA:
        return {
            "ALCHEMIST_VERSIONS_SOURCE": "peers",
            "ALCHEMIST_VERSIONS_PEER_URL": peer_url_template(job, spec),
        }
    if storage is VersionsStorage.S3:
        return {"ALCHEMIST_VERSIONS_SOURCE": "s3", "ALCHEMIST_VERSIONS_S3_URI": spec.versions.uri or ""}
    return {"ALCHEMIST_VERSIONS_SOURCE": "local"}


def versions_env(spec: JobSpec) -> list[dict[str, Any]]:
    """Container env for the versions bucket (endpoint, region, credentials by Secret reference)."""
    if spec.versions.storage is not VersionsStorage.S3:
        return []
    return s3_env(spec.versions.s3)


def versions_problems(spec: JobSpec) -> list[str]:
    versions = spec.versions
    problems = []
    if versions.storage is VersionsStorage.S3 and not versions.uri:
        problems.append("spec.versions.uri (s3://bucket/prefix) is required when spec.versions.storage is S3")
    if versions.storage is not VersionsStorage.S3 and versions.uri:
        problems.append("spec.versions.uri is only used with spec.versions.storage S3")
    if versions.storage is VersionsStorage.EMPTY_DIR and spec.replicas > 1:
        problems.append(
            f"spec.versions.storage EmptyDir loses versions with each pod; with {spec.replicas} replicas use "
            "PerReplica (the default), PersistentVolumeClaim or S3"
        )
    if versions.storage is VersionsStorage.PER_REPLICA and versions.access_mode is AccessMode.READ_WRITE_MANY:
        problems.append("spec.versions.accessMode ReadWriteMany is for storage PersistentVolumeClaim")
    return problems
