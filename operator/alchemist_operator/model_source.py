"""Where a job's checkpoint comes from, and what the pod needs to reach it.

`spec.model.uri` names the source:
- `pvc://<claim>/<path>`: a PersistentVolumeClaim of the job's namespace, mounted read-only;
- `oci://<image reference>`: an OCI image (a "modelcar"), mounted read-only as an image volume (Kubernetes
  1.33+ with the ImageVolume feature; nothing is copied, the node caches the image);
- `s3://<bucket>/<prefix>`: an S3-compatible store, copied into an emptyDir by the `model-fetch` init container
  (`python -m alchemist_worker.model_fetch`), credentials from the Secret named in `spec.model.s3`.
For `oci://` and `s3://`, `spec.model.path` (relative) is where the checkpoint lies inside the source.
Without a URI the older form applies: `path` in the image (source Image) or on `claimName` (source Volume).

Pure: builders return pod fragments and touch no API.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from alchemist_operator.job_spec import JobSpec, ModelSource, S3Spec

MODEL_FETCH_CONTAINER = "model-fetch"
# AWS's own variable names, which boto3 reads; the credentials Secret holds keys of the same names.
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_OPTIONAL_SECRET_KEYS = ("AWS_SESSION_TOKEN",)


class SourceKind(enum.StrEnum):
    IMAGE = "image"  # baked into the worker image
    CLAIM = "pvc"
    OCI = "oci"
    S3 = "s3"


@dataclass(frozen=True)
class ModelLocation:
    kind: SourceKind
    ref: str  # the claim name, the image reference, the s3:// URI, or the path in the worker image
    sub_path: str = ""  # where the checkpoint lies inside the claim, image or prefix


def model_location(spec: JobSpec) -> ModelLocation:
    model = spec.model
    uri = model.uri
    if uri is None:
        path = model.path or ""
        if model.source is ModelSource.VOLUME:
            return ModelLocation(SourceKind.CLAIM, model.claim_name or "", path)
        return ModelLocation(SourceKind.IMAGE, path)
    scheme, rest = uri.split("://", 1)
    if scheme == "pvc":
        claim, _, sub_path = rest.partition("/")
        return ModelLocation(SourceKind.CLAIM, claim, sub_path.strip("/"))
    inner = (model.path or "").strip("/")
    if scheme == "oci":
        return ModelLocation(SourceKind.OCI, rest, inner)
    return ModelLocation(SourceKind.S3, uri, inner)


def model_problems(spec: JobSpec) -> list[str]:
    """What the schema cannot say about the model's fields; one line per problem."""
    model = spec.model
    if model.uri is None:
        if not model.path:
            return ["set spec.model.uri (pvc://, oci:// or s3://) or spec.model.path"]
        return []
    problems = []
    if model.source is ModelSource.VOLUME or model.claim_name:
        problems.append(
            "spec.model.source and claimName are for spec.model.path; a uri says where the model is"
        )
    if model.path and (model.uri.startswith("pvc://") or model.path.startswith("/")):
        problems.append(
            "spec.model.path with a uri is a relative path inside an oci:// or s3:// source; "
            "for pvc:// put the path in the uri (pvc://claim/path)"
        )
    return problems


def model_path(spec: JobSpec) -> str:
    """The checkpoint's path in the worker container."""
    location = model_location(spec)
    if location.kind is SourceKind.IMAGE:
        return location.ref
    if location.kind is SourceKind.CLAIM and location.sub_path.startswith("/"):
        return location.sub_path  # the older form: an absolute path on the mounted claim
    root = spec.model.mount_path.rstrip("/")
    return f"{root}/{location.sub_path}" if location.sub_path else root


def s3_env(s3: S3Spec) -> list[dict[str, Any]]:
    """Endpoint, region and credentials for boto3; the credentials always by reference to the Secret."""
    env: list[dict[str, Any]] = []
    if s3.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": s3.endpoint})
    if s3.region:
        env.append({"name": "AWS_REGION", "value": s3.region})
    if s3.credentials_secret:
        for key in S3_SECRET_KEYS:
            ref = {"name": s3.credentials_secret, "key": key}
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
        for key in S3_OPTIONAL_SECRET_KEYS:
            optional = {"name": s3.credentials_secret, "key": key, "optional": True}
            env.append({"name": key, "valueFrom": {"secretKeyRef": optional}})
    return env


def model_pod_parts(
    spec: JobSpec, worker_image: str, security_context: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(pod volumes, worker mounts, init containers) that put the checkpoint at `model_path(spec)`."""
    location = model_location(spec)
    mount_path = spec.model.mount_path
    mount = {"name": "model", "mountPath": mount_path, "readOnly": True}
    if location.kind is SourceKind.IMAGE:
        return [], [], []
    if location.kind is SourceKind.CLAIM:
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": location.ref, "readOnly": True}}
        return [volume], [mount], []
    if location.kind is SourceKind.OCI:
        pull = spec.image_pull_policy.value
        return [{"name": "model", "image": {"reference": location.ref, "pullPolicy": pull}}], [mount], []
    fetch = {
        "name": MODEL_FETCH_CONTAINER,
        "image": worker_image,
        "imagePullPolicy": spec.image_pull_policy.value,
        "command": ["python", "-m", "alchemist_worker.model_fetch"],
        "args": [location.ref, mount_path],
        "env": s3_env(spec.model.s3),
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": [{"name": "model", "mountPath": mount_path}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": security_context,
    }
    return [{"name": "model", "emptyDir": {}}], [mount], [fetch]
