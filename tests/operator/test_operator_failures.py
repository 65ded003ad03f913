"""The whole operator against kmock and a real Redis, when things go wrong outside the spec: every failure is a
condition with a reason and a Warning Event, children put back after deletion or hand edits, and a Redis that
lost its data never moves replicas back to an older version."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from typing import Any

import redis
from alchemist_operator.operator_config import OperatorConfig
from alchemist_protocol.rollout_state import load_rollout
from kmock import KubernetesEmulator

from tests.operator.conftest import JOBS, eventually, has_object, job_manifest, running_operator, set_ready
from tests.operator.test_operator import JOB_PATH, NS, STS, condition, events, statefulset, status
from tests.operator.test_rollout_redis import publish, store_for


def fast(config: OperatorConfig) -> OperatorConfig:
    """Drift checks every few monitor rounds, so a test sees repairs within a second."""
    return dataclasses.replace(config, drift_check_seconds=0.3)


async def settled(kube: KubernetesEmulator) -> None:
    """Until kopf has recorded the spec as handled, so that what follows is the monitor's doing, not a handler's."""
    await eventually(
        lambda: (
            "alchemist.dev/last-handled-configuration"
            in (kube.objects[JOBS, NS, "chat"]["metadata"].get("annotations") or {})
        )
    )
    await asyncio.sleep(0.5)


def warning(kube: KubernetesEmulator, reason: str) -> dict[str, Any] | None:
    return next((e for e in events(kube) if e["reason"] == reason and e["type"] == "Warning"), None)


def secret(name: str, **data: str) -> dict[str, Any]:
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "data": encoded,
    }


async def test_a_missing_secret_is_a_condition_and_a_warning_until_it_appears(
    kube: KubernetesEmulator, operator_config: OperatorConfig
) -> None:
    spec = {"auth": {"apiKeysSecret": {"name": "chat-keys", "key": "keys"}}}
    await kube.post(JOB_PATH, json=job_manifest(**spec))
    async with running_operator(fast(operator_config)):
        await eventually(
            lambda: (condition(kube, "Reconciled") or ("",))[0] == "False", what="Reconciled False"
        )
        _, reason, message = condition(kube, "Reconciled")  # type: ignore[misc]
        assert reason == "SecretNotFound"
        assert "Secret chat-keys named by spec.auth.apiKeysSecret does not exist" in message
        posted = await eventually(lambda: warning(kube, "SecretNotFound"), what="a SecretNotFound Warning")
        assert posted["involvedObject"]["name"] == "chat" and "chat-keys" in posted["message"]
        await set_ready(kube, 1, 1)  # even with pods reported ready, the job is not
        await eventually(lambda: status(kube).get("phase") == "Degraded")
        assert condition(kube, "Ready")[:2] == ("False", "SecretNotFound")  # type: ignore[index]
        # The pods still get the key file (they wait for the Secret), and the condition clears once it exists.
        pod = statefulset(kube)["spec"]["template"]["spec"]
        assert {"name": "api-keys", "mountPath": "/etc/alchemist/auth/api", "readOnly": True} in pod[
            "containers"
        ][0]["volumeMounts"]
        wrong_key = await kube.post(f"/api/v1/namespaces/{NS}/secrets", json=secret("chat-keys", other="k1"))
        assert wrong_key.status in (200, 201)
        await eventually(lambda: condition(kube, "Reconciled")[1] == "SecretKeyNotFound")  # type: ignore[index]
        assert "has no key 'keys' (it has other)" in condition(kube, "Reconciled")[2]  # type: ignore[index]
        fixed = await kube.patch(
            f"/api/v1/namespaces/{NS}/secrets/chat-keys", json={"data": secret("x", keys="k")["data"]}
        )
        assert fixed.status == 200
        await eventually(lambda: condition(kube, "Ready") == ("True", "ReplicasReady", "1/1 replicas ready"))
        assert condition(kube, "Reconciled")[:2] == ("True", "ChildrenApplied")  # type: ignore[index]


async def test_a_403_from_the_api_server_is_a_condition_and_a_warning(
    kube: KubernetesEmulator, operator_config: OperatorConfig
) -> None:
    refusal = {"kind": "Status", "code": 403, "reason": "Forbidden", "message": "denied by policy no-gpus"}
    # Every write of the StatefulSet is refused (kmock stores a refused object all the same, so updates too).
    kube[f"post /apis/apps/v1/namespaces/{NS}/statefulsets"] << 403 << refusal
    kube[f"patch /apis/apps/v1/namespaces/{NS}/statefulsets/chat"] << 403 << refusal
    await kube.post(JOB_PATH, json=job_manifest())
    async with running_operator(fast(operator_config)):  # retried at every drift check, refused every time
        await eventually(lambda: (condition(kube, "Reconciled") or ("", ""))[1] == "Forbidden")
        message = condition(kube, "Reconciled")[2]  # type: ignore[index]
        assert "refused to write the StatefulSet chat (HTTP 403)" in message and "denied by policy" in message
        posted = await eventually(lambda: warning(kube, "Forbidden"))
        assert "StatefulSet chat" in posted["message"]
        assert condition(kube, "Ready")[:2] == ("False", "Forbidden")  # type: ignore[index]
        assert condition(kube, "Valid")[0] == "True"  # type: ignore[index]  # the spec is fine; the cluster is not
        await asyncio.sleep(
            1.0
        )  # retried, still refused: the condition stays and the Warning is not repeated
        assert condition(kube, "Reconciled")[1] == "Forbidden"  # type: ignore[index]
        assert len([e for e in events(kube) if e["reason"] == "Forbidden"]) == 1


async def test_an_invalid_spec_is_never_ready(
    kube: KubernetesEmulator, operator_config: OperatorConfig
) -> None:
    await kube.post(JOB_PATH, json=job_manifest(resources={"gpus": 2}))
    async with running_operator(operator_config):
        await eventually(lambda: status(kube).get("phase") == "Invalid")
        assert condition(kube, "Ready")[:2] == ("False", "InvalidSpec")  # type: ignore[index]
        assert "spec.resources.gpus is 2" in condition(kube, "Valid")[2]  # type: ignore[index]
        assert (await eventually(lambda: warning(kube, "InvalidSpec")))["involvedObject"]["name"] == "chat"


async def test_deleted_and_hand_edited_children_are_put_back(
    kube: KubernetesEmulator, operator_config: OperatorConfig
) -> None:
    shared = {"storage": "PersistentVolumeClaim"}
    await kube.post(JOB_PATH, json=job_manifest(replicas=2, versions=shared))
    async with running_operator(fast(operator_config)):
        await eventually(lambda: (condition(kube, "Reconciled") or ("",))[0] == "True")
        await settled(kube)

        response = await kube.delete(f"/apis/apps/v1/namespaces/{NS}/statefulsets/chat")
        assert response.status == 200
        await eventually(lambda: has_object(kube, STS, NS, "chat"), what="the StatefulSet recreated")
        assert statefulset(kube)["spec"]["replicas"] == 2
        repaired = await eventually(lambda: warning(kube, "DriftRepaired"))
        assert repaired["message"] == "the StatefulSet chat was deleted; recreated it"

        response = await kube.patch(
            f"/apis/apps/v1/namespaces/{NS}/statefulsets/chat", json={"spec": {"replicas": 7}}
        )
        assert response.status == 200 and statefulset(kube)["spec"]["replicas"] == 7
        await eventually(lambda: statefulset(kube)["spec"]["replicas"] == 2, what="replicas restored")

        config_map = f"/api/v1/namespaces/{NS}/configmaps/chat-config"
        response = await kube.patch(config_map, json={"data": {"ALCHEMIST_TRAINING_LEARNING_RATE": "0.9"}})
        assert response.status == 200
        await eventually(
            lambda: (
                kube.objects["v1/configmaps", NS, "chat-config"]["data"]["ALCHEMIST_TRAINING_LEARNING_RATE"]
                == "0.0001"
            )
        )
        await kube.delete(f"/api/v1/namespaces/{NS}/services/chat")
        await kube.delete(f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/chat")
        await eventually(lambda: has_object(kube, "v1/services", NS, "chat"), what="the Service recreated")
        await eventually(lambda: has_object(kube, "policy/v1/poddisruptionbudgets", NS, "chat"))

        # A versions claim grown by hand stays grown (claims only grow; shrinking it back would be refused).
        claim = f"/api/v1/namespaces/{NS}/persistentvolumeclaims/chat-versions"
        grown = {"spec": {"resources": {"requests": {"storage": "50Gi"}}}}
        assert (await kube.patch(claim, json=grown)).status == 200
        await asyncio.sleep(1.0)  # three drift checks
        live = kube.objects["v1/persistentvolumeclaims", NS, "chat-versions"]
        assert live["spec"]["resources"]["requests"]["storage"] == "50Gi"
        assert not [
            e
            for e in events(kube)
            if e["reason"] == "DriftRepaired" and "PersistentVolumeClaim" in e["message"]
        ]
        assert condition(kube, "Reconciled")[:2] == ("True", "ChildrenApplied")  # type: ignore[index]


async def test_a_crashing_worker_is_reported_with_its_last_words(
    kube: KubernetesEmulator, operator_config: OperatorConfig
) -> None:
    await kube.post(JOB_PATH, json=job_manifest())
    async with running_operator(operator_config):
        await eventually(lambda: has_object(kube, STS, NS, "chat"))
        labels = statefulset(kube)["spec"]["template"]["metadata"]["labels"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "chat-0", "namespace": NS, "labels": labels},
            "status": {
                "containerStatuses": [
                    {
                        "name": "worker",
                        "ready": False,
                        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
                        "lastState": {
                            "terminated": {
                                "exitCode": 2,
                                "message": "loading\nFileNotFoundError: model path /models/smollm2 does not exist",
                            }
                        },
                    }
                ]
            },
        }
        assert (await kube.post(f"/api/v1/namespaces/{NS}/pods", json=pod)).status in (200, 201)
        # Read once the status has a Ready condition (the first look may not have written one yet).
        await eventually(lambda: (condition(kube, "Ready") or ("", ""))[1] == "WorkersFailing")
        message = condition(kube, "Ready")[2]  # type: ignore[index]
        assert message.startswith(
            "chat-0: CrashLoopBackOff, back-off 40s, exit code 2: loading FileNotFoundError"
        )
        assert "model path /models/smollm2 does not exist" in message
        assert status(kube)["phase"] == "Degraded"
        posted = await eventually(lambda: warning(kube, "WorkerFailing"))
        assert "model path /models/smollm2 does not exist" in posted["message"]


async def test_a_redis_that_lost_its_data_gets_the_pointer_back_not_version_zero(
    kube: KubernetesEmulator, operator_config: OperatorConfig, redis_url: str
) -> None:
    store = store_for(redis_url)
    for version in (1, 2, 3):
        publish(store, version)
    await kube.post(JOB_PATH, json=job_manifest())
    async with running_operator(operator_config):
        await eventually(lambda: status(kube).get("currentVersion") == 3, what="version 3 rolled out")
        assert (status(kube).get("rollout") or {}).get("stableVersion") == 3

        redis.Redis.from_url(redis_url).flushall()  # Redis restarted without persistence
        lost = await eventually(lambda: warning(kube, "RedisStateLost"), what="a RedisStateLost Warning")
        assert "Redis has no rollout pointer, but the job last served version 3" in lost["message"]
        pointer, _ = load_rollout(store.client, store.keys)
        assert pointer is not None and pointer.stable_version == 3
        for _ in range(5):  # and it stays there: no later round moves it back
            await eventually(lambda: status(kube).get("currentVersion") == 3)
        assert load_rollout(store.client, store.keys)[0].stable_version == 3  # type: ignore[union-attr]
