"""The whole operator (kopf, handlers, monitor daemon, API layer) against kmock: a job's life from creation to
deletion, and specs it cannot act on."""

from __future__ import annotations

import copy
from typing import Any

import redis
from alchemist_operator.naming import CONFIG_HASH_ANNOTATION
from alchemist_operator.operator_config import OperatorConfig
from alchemist_protocol.keys import JobKeys
from alchemist_protocol.live_settings import read_live_settings
from kmock import KubernetesEmulator

from tests.charts.manifest_validation import crd_schemas, validate_manifest
from tests.operator.conftest import JOBS, eventually, has_object, job_manifest, running_operator, set_ready

NS = "team-a"
JOB_PATH = f"/apis/alchemist.dev/v1alpha1/namespaces/{NS}/continuallearningjobs"
STS = "apps/v1/statefulsets"


def status(kube: KubernetesEmulator, name: str = "chat") -> dict[str, Any]:
    return dict(kube.objects[JOBS, NS, name].get("status") or {})


def condition(kube: KubernetesEmulator, type_: str, name: str = "chat") -> tuple[str, str, str] | None:
    for c in status(kube, name).get("conditions", []):
        if c["type"] == type_:
            return c["status"], c["reason"], c["message"]
    return None


def events(kube: KubernetesEmulator) -> list[dict[str, Any]]:
    """Every Event the operator posted (kmock keeps only one unnamed Event per namespace; requests keep all)."""
    return [r.data for r in kube if r.method.value == "POST" and r.url.path.endswith("/events")]


def assert_valid_job(kube: KubernetesEmulator, crd: dict[str, Any], name: str = "chat") -> None:
    """The job as the operator left it, status included, passes the CRD's schema (the API server would refuse)."""
    validate_manifest(kube.objects[JOBS, NS, name].raw, crd_schemas([crd]))


def statefulset(kube: KubernetesEmulator, name: str = "chat") -> dict[str, Any]:
    return kube.objects[STS, NS, name].raw  # type: ignore[no-any-return]


async def patch_job(
    kube: KubernetesEmulator, patch: dict[str, Any], name: str = "chat", sub: str = ""
) -> None:
    """As kubectl would: a merge patch through the API, with the generation bump the API server would make."""
    generation = kube.objects[JOBS, NS, name]["metadata"]["generation"]
    body = {**patch, "metadata": {"generation": generation + 1}} if "spec" in patch else patch
    response = await kube.patch(f"{JOB_PATH}/{name}{sub}", json=body)
    assert response.status == 200, await response.text()


async def test_create_update_scale_suspend_and_delete(
    kube: KubernetesEmulator, operator_config: OperatorConfig, crd: dict[str, Any]
) -> None:
    shared = {"storage": "PersistentVolumeClaim"}
    response = await kube.post(JOB_PATH, json=job_manifest(replicas=2, versions=shared))
    assert response.status == 200
    async with running_operator(operator_config):
        # Create: every child, owned by the job, and a status that says the pods are not ready yet.
        await eventually(
            lambda: condition(kube, "Valid") == ("True", "SpecAccepted", "the children match the spec")
        )
        for resource, name in [
            ("v1/configmaps", "chat-config"),
            ("v1/persistentvolumeclaims", "chat-versions"),
            ("v1/services", "chat"),
            ("v1/services", "chat-headless"),
            (STS, "chat"),
            ("policy/v1/poddisruptionbudgets", "chat"),
        ]:
            owner = kube.objects[resource, NS, name]["metadata"]["ownerReferences"][0]
            assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
                "ContinualLearningJob",
                "chat",
                "uid-chat",
                True,
            )
        assert statefulset(kube)["spec"]["replicas"] == 2
        await eventually(lambda: status(kube).get("phase") == "Pending")
        assert status(kube)["observedGeneration"] == 1
        await eventually(
            lambda: any(e["reason"] == "Reconciled" and e["type"] == "Normal" for e in events(kube))
        )

        await set_ready(kube, 2, 2)
        await eventually(
            lambda: status(kube).get("phase") == "Running", what="Running once both pods are ready"
        )
        assert condition(kube, "Ready") == ("True", "ReplicasReady", "2/2 replicas ready")
        assert status(kube)["readyReplicas"] == 2 and status(kube)["selector"]
        assert_valid_job(kube, crd)

        # Update a training hyper-parameter: the running workers get it through Redis, the ConfigMap keeps it for
        # pods that start later, and no pod restarts (the pod template stays the same).
        template_before = copy.deepcopy(statefulset(kube)["spec"]["template"])
        await patch_job(kube, {"spec": {"training": {"learningRate": 0.0005}}})
        await eventually(
            lambda: (
                kube.objects["v1/configmaps", NS, "chat-config"]["data"]["ALCHEMIST_TRAINING_LEARNING_RATE"]
                == "0.0005"
            )
        )
        store = redis.Redis.from_url(operator_config.default_redis_url or "", decode_responses=True)
        keys = JobKeys(NS, "chat")
        await eventually(
            lambda: (
                (live := read_live_settings(store, keys)) is not None and live.training.learning_rate == 5e-4
            ),
            what="the new learning rate in Redis",
        )
        await eventually(lambda: status(kube).get("observedGeneration") == 2)
        assert statefulset(kube)["spec"]["template"] == template_before

        # A setting the worker reads only at start (LoRA's rank) rolls the pods (the template's config hash).
        hash_before = statefulset(kube)["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
        await patch_job(kube, {"spec": {"training": {"lora": {"rank": 8}}}})
        await eventually(
            lambda: (
                statefulset(kube)["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
                != hash_before
            )
        )
        await eventually(lambda: status(kube).get("observedGeneration") == 3)

        # Scale through the scale subresource, as `kubectl scale` does: more pods, no restart of the others.
        hash_before = statefulset(kube)["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
        await patch_job(kube, {"spec": {"replicas": 3}}, sub="/scale")
        await eventually(lambda: statefulset(kube)["spec"]["replicas"] == 3)
        assert (
            statefulset(kube)["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
            == hash_before
        )
        await eventually(
            lambda: condition(kube, "Ready") == ("False", "ReplicasNotReady", "2/3 replicas ready")
        )

        # Suspend: zero pods; the versions claim stays.
        await patch_job(kube, {"spec": {"suspend": True}})
        await eventually(lambda: statefulset(kube)["spec"]["replicas"] == 0)
        assert has_object(kube, "v1/persistentvolumeclaims", NS, "chat-versions")
        await set_ready(kube, 0, 0)
        await eventually(lambda: status(kube).get("phase") == "Suspended")
        await eventually(lambda: condition(kube, "Ready")[:2] == ("False", "Suspended"))  # type: ignore[index]
        assert_valid_job(kube, crd)

        # Resume.
        await patch_job(kube, {"spec": {"suspend": False}})
        await eventually(lambda: statefulset(kube)["spec"]["replicas"] == 3)

        # Delete: the job carries no finalizer (test_deletion.py), so it goes at once; the API server then deletes
        # the children through their owner references (kmock has no garbage collector; they are checked above).
        assert not kube.objects[JOBS, NS, "chat"]["metadata"].get("finalizers")
        response = await kube.delete(f"{JOB_PATH}/chat")
        assert response.status == 200
        await eventually(lambda: not has_object(kube, JOBS, NS, "chat"), what="the job to be gone")


async def test_invalid_specs_get_a_false_condition_and_an_event_and_the_operator_carries_on(
    kube: KubernetesEmulator, operator_config: OperatorConfig
) -> None:
    bad = job_manifest(name="bad", replicas=1, rollout={"strategy": "Canary", "canary": {"replicas": 1}})
    await kube.post(JOB_PATH, json=bad)
    await kube.post(JOB_PATH, json=job_manifest(name="good", replicas=2))
    async with running_operator(operator_config):
        await eventually(lambda: status(kube, "bad").get("phase") == "Invalid")
        valid = condition(kube, "Valid", "bad")
        assert valid is not None and valid[:2] == ("False", "InvalidSpec")
        assert "spec.rollout.canary.replicas (1) must be smaller than spec.replicas (1)" in valid[2]
        warning = await eventually(
            lambda: next((e for e in events(kube) if e["reason"] == "InvalidSpec"), None)
        )
        assert warning["type"] == "Warning" and warning["involvedObject"]["name"] == "bad"
        assert not has_object(kube, STS, NS, "bad")  # nothing was built from it
        # The other job is unaffected.
        await eventually(
            lambda: (
                condition(kube, "Valid", "good") is not None and condition(kube, "Valid", "good")[0] == "True"
            )
        )  # type: ignore[index]

        # Fixing the spec builds the job.
        await patch_job(kube, {"spec": {"replicas": 2}}, name="bad")
        await eventually(lambda: has_object(kube, STS, NS, "bad"))
        await eventually(lambda: condition(kube, "Valid", "bad")[:2] == ("True", "SpecAccepted"))  # type: ignore[index]

        # A valid job turned invalid keeps its children as they were.
        await patch_job(
            kube, {"spec": {"replicas": 5, "env": [{"name": "ALCHEMIST_REPLICA", "value": "x"}]}}, name="good"
        )
        await eventually(lambda: status(kube, "good").get("phase") == "Invalid")
        assert statefulset(kube, "good")["spec"]["replicas"] == 2
        assert "must not set ALCHEMIST_REPLICA" in condition(kube, "Valid", "good")[2]  # type: ignore[index]


async def test_a_manifest_the_api_server_rejects_is_reported_as_invalid(
    kube: KubernetesEmulator, operator_config: OperatorConfig
) -> None:
    rejection = {
        "kind": "Status",
        "code": 422,
        "reason": "Invalid",
        "message": "spec.template: quota exceeded",
    }
    kube[f"post /apis/apps/v1/namespaces/{NS}/statefulsets"] << 422 << rejection
    await kube.post(JOB_PATH, json=job_manifest())
    async with running_operator(operator_config):
        await eventually(lambda: status(kube).get("phase") == "Invalid")
        message = condition(kube, "Valid")[2]  # type: ignore[index]
        assert "the API server rejected the StatefulSet" in message and "quota exceeded" in message


async def test_a_job_whose_redis_is_down_is_degraded_not_fatal(
    kube: KubernetesEmulator, operator_config: OperatorConfig
) -> None:
    await kube.post(JOB_PATH, json=job_manifest(feedback={"redisUrl": "redis://127.0.0.1:1/0"}))
    async with running_operator(operator_config):
        await eventually(
            lambda: (
                condition(kube, "FeedbackConnected") is not None
                and condition(kube, "FeedbackConnected")[0] == "False"
            )
        )  # type: ignore[index]
        assert condition(kube, "FeedbackConnected")[1] == "RedisUnreachable"  # type: ignore[index]
        await set_ready(kube, 1, 1)
        await eventually(lambda: status(kube).get("phase") == "Degraded")
        # Children were built all the same, with the job's own Redis for the workers.
        env = {
            e["name"]: e.get("value")
            for e in statefulset(kube)["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        assert env["ALCHEMIST_REDIS_URL"] == "redis://127.0.0.1:1/0"


async def test_without_any_redis_the_job_is_invalid(
    kube: KubernetesEmulator, no_redis_config: OperatorConfig
) -> None:
    await kube.post(JOB_PATH, json=job_manifest())
    async with running_operator(no_redis_config):
        await eventually(lambda: status(kube).get("phase") == "Invalid")
        assert "no Redis for feedback" in condition(kube, "Valid")[2]  # type: ignore[index]
