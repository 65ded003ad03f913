"""The pure builders: what a job's spec turns into, checked field by field and against the Kubernetes schemas."""

from __future__ import annotations

from typing import Any

import pytest
from alchemist_operator.children import desired_children
from alchemist_operator.job_spec import parse_job_spec
from alchemist_operator.naming import CONFIG_HASH_ANNOTATION, JobRef
from alchemist_operator.operator_config import OperatorConfig
from alchemist_operator.worker_env import worker_config

from tests.charts.manifest_validation import validate_manifest

JOB = JobRef(namespace="team-a", name="chat", uid="1234")
CONFIG = OperatorConfig(worker_image="alchemist/worker:1", default_redis_url="redis://redis.alchemist:6379/0")


def children(**spec: Any) -> dict[str, dict[str, Any]]:
    built = desired_children(JOB, parse_job_spec({"model": {"path": "/models/m"}, **spec}), CONFIG)
    return {f"{m['kind']}/{m['metadata']['name']}": m for m in built}


def container(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return objs["StatefulSet/chat"]["spec"]["template"]["spec"]["containers"][0]


def env_of(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(objs)["env"]}


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {
            "replicas": 3,
            "versions": {"storage": "PersistentVolumeClaim"},
            "resources": {
                "gpus": 2,
                "nodeSelector": {"gpu": "h100"},
                "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            },
        },
        {
            "model": {"path": "ckpt", "source": "Volume", "claimName": "weights"},
            "versions": {"storage": "EmptyDir"},
        },
        {
            "suspend": True,
            "feedback": {"redisSecretRef": {"name": "redis"}},
            "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
        },
    ],
)
def test_every_child_is_a_valid_kubernetes_object_owned_by_the_job(spec: dict[str, Any]) -> None:
    objs = children(**spec)
    shared_claim = ["PersistentVolumeClaim/chat-versions"] if "'PersistentVolumeClaim'" in str(spec) else []
    assert sorted(objs) == sorted(
        [
            "ConfigMap/chat-config",
            *shared_claim,
            "PodDisruptionBudget/chat",
            "Service/chat",
            "Service/chat-headless",
            "StatefulSet/chat",
        ]
    )
    for manifest in objs.values():
        validate_manifest(manifest, {})
        (owner,) = manifest["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "alchemist.dev/v1alpha1",
            "kind": "ContinualLearningJob",
            "name": "chat",
            "uid": "1234",
            "controller": True,
            "blockOwnerDeletion": True,
        }


def test_statefulset_runs_the_worker_with_gpus_probes_and_a_versions_volume() -> None:
    objs = children(
        replicas=2,
        resources={"gpus": 2, "memory": "64Gi"},
        serving={"port": 9000},
        versions={"storage": "PersistentVolumeClaim"},
    )
    sts = objs["StatefulSet/chat"]
    assert sts["spec"]["replicas"] == 2
    assert sts["spec"]["serviceName"] == "chat-headless"
    assert sts["spec"]["selector"]["matchLabels"] == JOB.selector_labels()
    worker = container(objs)
    assert worker["command"] == ["alchemist-worker"] and worker["args"] == ["serve"]
    assert worker["image"] == "alchemist/worker:1"
    assert worker["resources"]["limits"] == {"memory": "64Gi", "nvidia.com/gpu": 2}
    assert worker["ports"] == [{"name": "http", "containerPort": 9000, "protocol": "TCP"}]
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {m["mountPath"] for m in worker["volumeMounts"]} == {"/var/lib/alchemist/versions", "/dev/shm"}
    pod = sts["spec"]["template"]["spec"]
    # Every replica mounts the one versions claim: the trainer publishes there, each replica loads from it.
    assert {"name": "versions", "persistentVolumeClaim": {"claimName": "chat-versions"}} in pod["volumes"]
    claim = objs["PersistentVolumeClaim/chat-versions"]["spec"]
    assert claim == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "20Gi"}}}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False


def test_cpu_job_requests_no_gpu_and_a_volume_model_is_mounted_read_only() -> None:
    objs = children(
        resources={"gpus": 0, "cpu": 2, "memory": "4Gi"},
        recording={"hostMemory": "1Gi"},
        model={"path": "smollm2", "source": "Volume", "claimName": "weights", "mountPath": "/weights"},
    )
    worker = container(objs)
    assert "nvidia.com/gpu" not in worker["resources"]["limits"]
    assert worker["resources"]["requests"]["cpu"] == "2"
    assert {"name": "model", "mountPath": "/weights", "readOnly": True} in worker["volumeMounts"]
    volumes = objs["StatefulSet/chat"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in volumes
    data = objs["ConfigMap/chat-config"]["data"]
    assert data["ALCHEMIST_MODEL"] == "/weights/smollm2"
    assert data["ALCHEMIST_DEVICE"] == "cpu"


def test_suspend_scales_to_zero_and_keeps_the_versions_claim() -> None:
    shared = {"storage": "PersistentVolumeClaim"}
    running = children(replicas=3, versions=shared)
    suspended = children(replicas=3, suspend=True, versions=shared)
    assert suspended["StatefulSet/chat"]["spec"]["replicas"] == 0
    assert suspended["PersistentVolumeClaim/chat-versions"] == running["PersistentVolumeClaim/chat-versions"]


def test_a_retained_versions_claim_has_no_owner() -> None:
    shared = {"storage": "PersistentVolumeClaim", "retainOnDelete": True, "storageClassName": "nfs"}
    claim = children(versions=shared)["PersistentVolumeClaim/chat-versions"]
    assert "ownerReferences" not in claim["metadata"]
    assert claim["spec"]["storageClassName"] == "nfs"


def test_worker_configuration_goes_through_the_config_map_and_rolls_the_pods() -> None:
    objs = children(
        training={"learningRate": 0.001, "lora": {"rank": 8, "targetModules": ["q_proj", "v_proj"]}}
    )
    data = objs["ConfigMap/chat-config"]["data"]
    assert data["ALCHEMIST_TRAINING_LEARNING_RATE"] == "0.001"
    assert data["ALCHEMIST_TRAINING_LORA_RANK"] == "8"
    assert data["ALCHEMIST_TRAINING_LORA_TARGET_MODULES"] == "q_proj,v_proj"
    assert data["ALCHEMIST_RECORD_HOST_MIB"] == "8192.0"
    assert data["ALCHEMIST_JOB"] == "chat" and data["ALCHEMIST_SERVED_MODEL_NAME"] == "chat"
    assert all(isinstance(v, str) for v in data.values())
    assert container(objs)["envFrom"] == [{"configMapRef": {"name": "chat-config"}}]

    def config_hash(o: dict[str, dict[str, Any]]) -> str:
        return str(
            o["StatefulSet/chat"]["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
        )

    assert config_hash(objs) == config_hash(
        children(training={"learningRate": 0.001, "lora": {"rank": 8, "targetModules": ["q_proj", "v_proj"]}})
    )
    assert config_hash(objs) != config_hash(children(training={"learningRate": 0.002}))
    # Scaling is not a configuration change: it must not restart the pods.
    assert config_hash(children(replicas=1)) == config_hash(children(replicas=5))


def test_per_pod_identity_and_redis_come_from_env() -> None:
    env = env_of(children())
    assert env["ALCHEMIST_REPLICA"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["ALCHEMIST_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["ALCHEMIST_REDIS_URL"] == "redis://redis.alchemist:6379/0"  # the operator's default
    assert (
        env_of(children(feedback={"redisUrl": "redis://mine:6379/1"}))["ALCHEMIST_REDIS_URL"]
        == "redis://mine:6379/1"
    )
    from_secret = env_of(children(feedback={"redisSecretRef": {"name": "creds"}}))["ALCHEMIST_REDIS_URL"]
    assert from_secret == {"secretKeyRef": {"name": "creds", "key": "url"}}


def test_services_and_disruption_budget() -> None:
    objs = children(serving={"port": 8100})
    headless, client = objs["Service/chat-headless"], objs["Service/chat"]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["ports"][0]["port"] == 8100
    assert client["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert client["spec"]["selector"] == JOB.selector_labels()
    assert objs["PodDisruptionBudget/chat"]["spec"]["maxUnavailable"] == 1


def test_config_values_are_exactly_the_documented_variables() -> None:
    """docs/worker-environment.md lists every variable the operator sets; keep the two in step."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "worker-environment.md").read_text()
    names = set(worker_config(JOB, parse_job_spec({"model": {"path": "/m"}}))) | set(env_of(children()))
    s3 = {"model": {"path": "/m"}, "versions": {"storage": "S3", "uri": "s3://bucket/versions"}}
    names |= set(worker_config(JOB, parse_job_spec(s3)))
    gated = {"model": {"path": "/m"}, "evaluation": {"path": "/sets/eval.jsonl"}}
    names |= set(worker_config(JOB, parse_job_spec(gated)))
    documented = {line.split("`")[1] for line in doc.splitlines() if line.startswith("| `ALCHEMIST_")}
    assert names == documented


def test_the_feedback_stream_defaults_to_the_jobs_key_and_can_be_named() -> None:
    default = children()["ConfigMap/chat-config"]["data"]
    assert default["ALCHEMIST_FEEDBACK_STREAM"] == "alchemist:team-a:chat:feedback"
    named = children(feedback={"stream": "shop:reactions"})["ConfigMap/chat-config"]["data"]
    assert named["ALCHEMIST_FEEDBACK_STREAM"] == "shop:reactions"
    with pytest.raises(ValueError):
        parse_job_spec({"model": {"path": "/m"}, "feedback": {"stream": "has space"}})
