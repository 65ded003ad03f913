"""Pod-level failures summarized for the job: pure readings of pods and claims, then the whole operator against
kmock (conditions and Warning Events)."""

from __future__ import annotations

import datetime
from typing import Any

from alchemist_operator.operator_config import OperatorConfig
from alchemist_operator.pod_health import pod_problems
from alchemist_operator.workload_health import model_fetch, unbound_claims, unschedulable_pods
from kmock import KubernetesEmulator

from tests.operator.conftest import eventually, has_object, job_manifest, running_operator
from tests.operator.test_operator import JOB_PATH, NS, STS, condition, statefulset, status
from tests.operator.test_operator_failures import secret, warning

NOW = datetime.datetime(2026, 11, 30, 12, 0, tzinfo=datetime.UTC)


def _pod(name: str, status: dict[str, Any], labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NS, "labels": labels or {}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "status": status}


UNSCHEDULABLE = {
    "phase": "Pending",
    "conditions": [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
        }
    ],
}
FETCHING = {
    "phase": "Pending",
    "initContainerStatuses": [
        {"name": "model-fetch", "ready": False, "state": {"running": {"startedAt": "2026-11-30T11:57:55Z"}}}
    ],
}
OOM = {
    "containerStatuses": [
        {
            "name": "worker",
            "ready": False,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 20s"}},
            "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
        }
    ]
}


def _claim(
    name: str, phase: str, created: str, modes: list[str], storage_class: str | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": modes}
    if storage_class:
        spec["storageClassName"] = storage_class
    meta = {"name": name, "namespace": NS, "creationTimestamp": created}
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": meta,
        "spec": spec,
        "status": {"phase": phase},
    }


def test_unschedulable_pods_say_what_the_scheduler_said() -> None:
    pods = [_pod("chat-1", UNSCHEDULABLE), _pod("chat-0", {"phase": "Running"})]
    assert unschedulable_pods(pods) == (
        "chat-1: Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
    )


def test_an_oom_killed_worker_is_named_with_its_memory_limit() -> None:
    (line,) = pod_problems([_pod("chat-0", OOM)])
    assert line.startswith("chat-0: CrashLoopBackOff, back-off 20s, exit code 137 (OOMKilled")
    assert "spec.resources.memory" in line


def test_claims_pending_past_the_grace_period_are_reported_with_a_hint() -> None:
    claims = [
        _claim("chat-versions", "Pending", "2026-11-30T11:57:00Z", ["ReadWriteMany"]),
        _claim(
            "versions-chat-0", "Pending", "2026-11-30T11:59:30Z", ["ReadWriteOnce"], "fast"
        ),  # just created
        _claim("versions-chat-1", "Bound", "2026-11-30T10:00:00Z", ["ReadWriteOnce"]),
    ]
    (line,) = unbound_claims(claims, NOW)
    assert line.startswith(
        "claim chat-versions (ReadWriteMany, the default StorageClass) is Pending since 2026-11-30T11:57:00Z"
    )
    assert "use spec.versions.storage PerReplica" in line
    later = NOW + datetime.timedelta(minutes=5)
    assert "claim versions-chat-0 (ReadWriteOnce, fast) is Pending" in unbound_claims(claims, later)[1]


def test_model_fetch_running_and_failed() -> None:
    failed = {
        "initContainerStatuses": [
            {
                "name": "model-fetch",
                "ready": False,
                "restartCount": 2,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {
                    "terminated": {
                        "exitCode": 1,
                        "message": "model-fetch failed: no objects under s3://w/m: check the bucket",
                    }
                },
            }
        ]
    }
    reading = model_fetch([_pod("chat-0", FETCHING), _pod("chat-1", failed)])
    assert reading.fetching == ("chat-0: fetching the model since 2026-11-30T11:57:55Z",)
    assert reading.failed == (
        "chat-1: model fetch exit code 1: model-fetch failed: no objects under s3://w/m: check the bucket",
    )
    # The same failure is a crashing container for pod_problems: Ready says WorkersFailing, with its words.
    assert "no objects under s3://w/m" in pod_problems([_pod("chat-1", failed)])[0]


async def test_the_operator_reports_unbound_claims_unschedulable_pods_and_model_fetches(
    kube: KubernetesEmulator, operator_config: OperatorConfig
) -> None:
    manifest = job_manifest()
    manifest["spec"]["model"] = {"uri": "s3://weights/smollm2", "s3": {"credentialsSecret": "s3"}}
    keys = secret("s3", AWS_ACCESS_KEY_ID="id", AWS_SECRET_ACCESS_KEY="key")  # preflight checks both keys
    assert (await kube.post(f"/api/v1/namespaces/{NS}/secrets", json=keys)).status in (200, 201)
    await kube.post(JOB_PATH, json=manifest)
    async with running_operator(operator_config):
        await eventually(lambda: has_object(kube, STS, NS, "chat"))
        sts = statefulset(kube)
        assert sts["spec"]["template"]["spec"]["initContainers"][0]["name"] == "model-fetch"
        labels = sts["spec"]["template"]["metadata"]["labels"]
        claim = _claim(
            "versions-chat-0", "Pending", "2026-01-01T00:00:00Z", ["ReadWriteOnce"], "missing-class"
        )
        claim["metadata"]["labels"] = labels  # what the StatefulSet controller copies from the selector
        assert (await kube.post(f"/api/v1/namespaces/{NS}/persistentvolumeclaims", json=claim)).status in (
            200,
            201,
        )
        assert (
            await kube.post(f"/api/v1/namespaces/{NS}/pods", json=_pod("chat-0", FETCHING, labels))
        ).status in (
            200,
            201,
        )
        await eventually(lambda: (condition(kube, "VolumesBound") or ("", "", ""))[1] == "ClaimPending")
        assert (
            "claim versions-chat-0 (ReadWriteOnce, missing-class) is Pending"
            in (condition(kube, "VolumesBound") or ("", "", ""))[2]
        )
        assert (condition(kube, "Ready") or ("", "", ""))[1] == "VolumeNotBound"
        # The claim was posted before the pod: a status pass may have seen the one and not yet the other.
        await eventually(
            lambda: (condition(kube, "ModelAvailable") or ("", "", ""))[:2] == ("False", "Fetching")
        )
        posted = await eventually(lambda: warning(kube, "VolumeNotBound"))
        assert "missing-class" in posted["message"]

        unschedulable = _pod("chat-1", UNSCHEDULABLE, labels)
        assert (await kube.post(f"/api/v1/namespaces/{NS}/pods", json=unschedulable)).status in (200, 201)
        await eventually(lambda: (condition(kube, "Ready") or ("", "", ""))[1] == "WorkersFailing")
        assert (
            "chat-1: Unschedulable: 0/3 nodes are available" in (condition(kube, "Ready") or ("", "", ""))[2]
        )
        assert status(kube)["phase"] == "Degraded"
        posted = await eventually(lambda: warning(kube, "WorkerFailing"))
        assert "Insufficient nvidia.com/gpu" in posted["message"]
