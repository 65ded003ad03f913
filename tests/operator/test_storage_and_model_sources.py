"""Where versions live and where the model comes from: the pod fragments each choice builds, valid offline."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from alchemist_operator.children import desired_children
from alchemist_operator.job_spec import parse_job_spec
from alchemist_operator.naming import JobRef
from alchemist_operator.operator_config import OperatorConfig
from alchemist_operator.spec_checks import spec_problems

from tests.charts.manifest_validation import validate_manifest

JOB = JobRef(namespace="team-a", name="chat", uid="1234")
CONFIG = OperatorConfig(worker_image="alchemist/worker:1", default_redis_url="redis://redis.alchemist:6379/0")


def built(**spec: Any) -> dict[str, dict[str, Any]]:
    raw = {"model": {"path": "/models/m"}, **spec}
    return {
        f"{m['kind']}/{m['metadata']['name']}": m for m in desired_children(JOB, parse_job_spec(raw), CONFIG)
    }


def pod_of(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    pod: dict[str, Any] = objs["StatefulSet/chat"]["spec"]["template"]["spec"]
    return pod


def problems(**spec: Any) -> list[str]:
    return spec_problems("chat", parse_job_spec({"model": {"path": "/models/m"}, **spec}), CONFIG)


def test_default_versions_storage_is_a_read_write_once_claim_per_replica() -> None:
    objs = built(replicas=3)
    assert not [name for name in objs if name.startswith("PersistentVolumeClaim/")]  # nothing shared to bind
    sts = objs["StatefulSet/chat"]
    (template,) = sts["spec"]["volumeClaimTemplates"]
    assert template["metadata"]["name"] == "versions"
    assert template["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "20Gi"}},
    }
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Delete",
        "whenScaled": "Retain",
    }
    assert "versions" not in {v["name"] for v in pod_of(objs)["volumes"]}  # the template provides it
    assert {"name": "versions", "mountPath": "/var/lib/alchemist/versions"} in pod_of(objs)["containers"][0][
        "volumeMounts"
    ]
    data = objs["ConfigMap/chat-config"]["data"]
    assert data["ALCHEMIST_VERSIONS_SOURCE"] == "peers"
    assert data["ALCHEMIST_VERSIONS_PEER_URL"] == "http://{replica}.chat-headless.team-a.svc:8000"
    validate_manifest(sts, {})
    assert problems(replicas=3) == []


def test_per_replica_claims_can_be_kept_and_given_a_class() -> None:
    sts = built(versions={"retainOnDelete": True, "storageClassName": "local-path"})["StatefulSet/chat"]
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "local-path"
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"


def test_shared_claim_defaults_to_read_write_many() -> None:
    objs = built(versions={"storage": "PersistentVolumeClaim"})
    assert objs["PersistentVolumeClaim/chat-versions"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "volumeClaimTemplates" not in objs["StatefulSet/chat"]["spec"]
    assert objs["ConfigMap/chat-config"]["data"]["ALCHEMIST_VERSIONS_SOURCE"] == "local"
    once = built(versions={"storage": "PersistentVolumeClaim", "accessMode": "ReadWriteOnce"})
    assert once["PersistentVolumeClaim/chat-versions"]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_s3_versions_get_the_bucket_and_credentials_by_reference() -> None:
    versions = {
        "storage": "S3",
        "uri": "s3://models/chat-versions",
        "s3": {
            "endpoint": "http://minio.storage:9000",
            "region": "eu-west-1",
            "credentialsSecret": "s3-creds",
        },
    }
    objs = built(replicas=2, versions=versions)
    assert objs["ConfigMap/chat-config"]["data"]["ALCHEMIST_VERSIONS_S3_URI"] == "s3://models/chat-versions"
    env = {e["name"]: e for e in pod_of(objs)["containers"][0]["env"]}
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio.storage:9000"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    assert "value" not in env["AWS_ACCESS_KEY_ID"]
    assert {"name": "versions", "emptyDir": {"sizeLimit": "20Gi"}} in pod_of(objs)["volumes"]
    validate_manifest(objs["StatefulSet/chat"], {})
    assert problems(replicas=2, versions=versions) == []


@pytest.mark.parametrize(
    ("versions", "replicas", "expected"),
    [
        ({"storage": "S3"}, 1, "spec.versions.uri (s3://bucket/prefix) is required"),
        ({"uri": "s3://b/v"}, 1, "spec.versions.uri is only used with spec.versions.storage S3"),
        ({"storage": "EmptyDir"}, 2, "EmptyDir loses versions with each pod"),
        ({"accessMode": "ReadWriteMany"}, 1, "ReadWriteMany is for storage PersistentVolumeClaim"),
    ],
)
def test_versions_storage_problems(versions: dict[str, Any], replicas: int, expected: str) -> None:
    assert any(expected in p for p in problems(versions=versions, replicas=replicas))


def test_s3_model_is_fetched_by_an_init_container_into_an_empty_dir() -> None:
    model = {
        "uri": "s3://weights/llama-3.1-8b",
        "path": "instruct",
        "s3": {"endpoint": "https://s3.example.com", "credentialsSecret": "model-creds"},
    }
    objs = built(model=model)
    pod = pod_of(objs)
    (fetch,) = pod["initContainers"]
    assert fetch["name"] == "model-fetch" and fetch["image"] == "alchemist/worker:1"
    assert fetch["command"] == ["python", "-m", "alchemist_worker.model_fetch"]
    assert fetch["args"] == ["s3://weights/llama-3.1-8b", "/models"]
    assert fetch["volumeMounts"] == [{"name": "model", "mountPath": "/models"}]
    env = {e["name"]: e for e in fetch["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "model-creds",
        "key": "AWS_ACCESS_KEY_ID",
    }
    assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert {"name": "model", "emptyDir": {}} in pod["volumes"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in pod["containers"][0]["volumeMounts"]
    assert objs["ConfigMap/chat-config"]["data"]["ALCHEMIST_MODEL"] == "/models/instruct"
    validate_manifest(objs["StatefulSet/chat"], {})
    assert problems(model=model) == []


def test_pvc_uri_mounts_the_claim_read_only() -> None:
    objs = built(model={"uri": "pvc://weights/hf/smollm2", "mountPath": "/weights"})
    pod = pod_of(objs)
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in pod[
        "volumes"
    ]
    assert "initContainers" not in pod
    assert objs["ConfigMap/chat-config"]["data"]["ALCHEMIST_MODEL"] == "/weights/hf/smollm2"


def test_oci_uri_mounts_the_image_as_a_volume() -> None:
    objs = built(model={"uri": "oci://ghcr.io/acme/smollm2:1.0", "path": "model"}, imagePullPolicy="Always")
    pod = pod_of(objs)
    assert {
        "name": "model",
        "image": {"reference": "ghcr.io/acme/smollm2:1.0", "pullPolicy": "Always"},
    } in pod["volumes"]
    assert objs["ConfigMap/chat-config"]["data"]["ALCHEMIST_MODEL"] == "/models/model"
    # Image volumes exist from Kubernetes 1.31 on (beta in 1.33): validated against a schema that has them.
    kubernetes_validate.validate(objs["StatefulSet/chat"], "1.33.0", strict=True)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"source": "Image"}, "set spec.model.uri (pvc://, oci:// or s3://) or spec.model.path"),
        ({"uri": "s3://b/m", "claimName": "weights"}, "a uri says where the model is"),
        ({"uri": "pvc://weights", "path": "m"}, "for pvc:// put the path in the uri"),
        ({"uri": "s3://b/m", "path": "/abs"}, "relative path inside an oci:// or s3:// source"),
    ],
)
def test_model_source_problems(model: dict[str, Any], expected: str) -> None:
    spec = parse_job_spec({"model": model})
    assert any(expected in p for p in spec_problems("chat", spec, CONFIG))


@pytest.mark.parametrize("uri", ["http://x/m", "pvc://", "s3://", "oci://", "pvc://Bad_Claim/m"])
def test_a_model_uri_of_another_form_is_refused_by_the_schema(uri: str) -> None:
    with pytest.raises(ValueError, match=r"spec\.model\.uri"):
        parse_job_spec({"model": {"uri": uri}})


def test_the_s3_credentials_secrets_are_checked_before_the_pods_need_them() -> None:
    from alchemist_operator.preflight import referenced_secrets

    spec = parse_job_spec(
        {
            "model": {"uri": "s3://w/m", "s3": {"credentialsSecret": "model-creds"}},
            "versions": {
                "storage": "S3",
                "uri": "s3://v/chat",
                "s3": {"credentialsSecret": "versions-creds"},
            },
        }
    )
    assert [(u.name, u.key, u.field) for u in referenced_secrets(spec)] == [
        ("model-creds", "AWS_ACCESS_KEY_ID", "spec.model.s3.credentialsSecret"),
        ("model-creds", "AWS_SECRET_ACCESS_KEY", "spec.model.s3.credentialsSecret"),
        ("versions-creds", "AWS_ACCESS_KEY_ID", "spec.versions.s3.credentialsSecret"),
        ("versions-creds", "AWS_SECRET_ACCESS_KEY", "spec.versions.s3.credentialsSecret"),
    ]


async def test_a_pvc_uri_naming_a_missing_claim_is_a_blocker(kube: Any) -> None:
    from alchemist_operator.cluster_api import ClusterApi
    from alchemist_operator.preflight import find_blockers

    api = ClusterApi.from_environment()  # the kube fixture points it at kmock
    spec = parse_job_spec({"model": {"uri": "pvc://weights/smollm2"}})
    (blocker,) = await find_blockers(JOB, spec, api)
    assert blocker.reason == "ModelVolumeNotFound"
    assert "PersistentVolumeClaim weights named by spec.model.uri does not exist" in blocker.message
