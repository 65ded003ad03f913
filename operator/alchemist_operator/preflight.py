"""What a valid spec still needs from the cluster: the Secrets and the model volume it names.

A spec can be valid and still not work: a Secret that does not exist (or lacks the key) leaves the pods in
CreateContainerConfigError, a model claim that does not exist leaves them Pending, and neither says so on the
job. These checks find that before the pods do, so the job's status and Events name the missing object.
`referenced_secrets` is pure; `find_blockers` reads the API (key names only, never values).
"""

from __future__ import annotations

from dataclasses import dataclass

from alchemist_operator.cluster_api import ApiError, ClusterApi
from alchemist_operator.job_spec import JobSpec, VersionsStorage
from alchemist_operator.job_status import Blocker
from alchemist_operator.model_source import S3_SECRET_KEYS, SourceKind, model_location
from alchemist_operator.naming import JobRef


@dataclass(frozen=True)
class SecretUse:
    name: str
    key: str
    field: str  # the spec field that names it, for the message


def referenced_secrets(spec: JobSpec) -> list[SecretUse]:
    """Every Secret key the job's pods or the operator will read, in spec order."""
    uses: list[SecretUse] = []
    if spec.feedback.redis_secret_ref is not None:
        ref = spec.feedback.redis_secret_ref
        uses.append(SecretUse(ref.name, ref.key, "spec.feedback.redisSecretRef"))
    if spec.redis.password_secret is not None:
        password = spec.redis.password_secret
        uses.append(SecretUse(password.name, password.key, "spec.redis.passwordSecret"))
    for field, secret in (
        ("spec.auth.apiKeysSecret", spec.auth.api_keys_secret),
        ("spec.auth.adminKeysSecret", spec.auth.admin_keys_secret),
    ):
        if secret is not None:
            uses.append(SecretUse(secret.name, secret.key, field))
    buckets = [("spec.model.s3.credentialsSecret", spec.model.s3)]
    if spec.versions.storage is VersionsStorage.S3:
        buckets.append(("spec.versions.s3.credentialsSecret", spec.versions.s3))
    for field, s3 in buckets:
        if s3.credentials_secret:
            uses += [SecretUse(s3.credentials_secret, key, field) for key in S3_SECRET_KEYS]
    for var in spec.env:
        source = var.value_from
        if source is not None and source.secret_key_ref is not None and not source.secret_key_ref.optional:
            ref_ = source.secret_key_ref
            uses.append(SecretUse(ref_.name, ref_.key, f"spec.env {var.name}"))
    return uses


async def find_blockers(job: JobRef, spec: JobSpec, cluster: ClusterApi) -> list[Blocker]:
    blockers: list[Blocker] = []
    keys_by_secret: dict[str, frozenset[str] | None] = {}
    for use in referenced_secrets(spec):
        try:
            if use.name not in keys_by_secret:
                keys_by_secret[use.name] = await cluster.secret_keys(job.namespace, use.name)
        except ApiError as exc:
            if exc.status != 403:
                raise
            blockers.append(
                Blocker("Forbidden", f"the operator may not read Secret {use.name} ({use.field}): {exc}")
            )
            keys_by_secret[use.name] = frozenset({use.key})  # reported once; do not also call it missing
            continue
        keys = keys_by_secret[use.name]
        if keys is None:
            blockers.append(
                Blocker(
                    "SecretNotFound",
                    f"Secret {use.name} named by {use.field} does not exist in namespace {job.namespace}",
                )
            )
        elif use.key not in keys:
            blockers.append(
                Blocker(
                    "SecretKeyNotFound",
                    f"Secret {use.name} named by {use.field} has no key {use.key!r} "
                    f"(it has {', '.join(sorted(keys)) or 'none'})",
                )
            )
    location = model_location(spec)
    if location.kind is SourceKind.CLAIM and location.ref:
        claim = await cluster.get("v1", "PersistentVolumeClaim", job.namespace, location.ref)
        if claim is None:
            field = "spec.model.uri" if spec.model.uri else "spec.model.claimName"
            blockers.append(
                Blocker(
                    "ModelVolumeNotFound",
                    f"PersistentVolumeClaim {location.ref} named by {field} does not exist "
                    f"in namespace {job.namespace}; the pods cannot start without the model",
                )
            )
    return blockers
