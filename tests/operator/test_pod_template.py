"""Pod options, the stop sequence and the thread count in the StatefulSet a spec builds; which spec changes roll
the pods and which reach running workers without a restart."""

from __future__ import annotations

from typing import Any

import pytest
from alchemist_operator.children import desired_children
from alchemist_operator.job_spec import InvalidSpec
from alchemist_operator.live_config import LIVE_CONFIG_KEYS, live_settings
from alchemist_operator.naming import CONFIG_HASH_ANNOTATION, JobRef
from alchemist_operator.operator_config import OperatorConfig
from alchemist_operator.spec_checks import validate_job
from alchemist_protocol.live_settings import LiveTraining

from tests.charts.manifest_validation import validate_manifest

JOB = JobRef(namespace="team-a", name="chat", uid="1234")
CONFIG = OperatorConfig(worker_image="alchemist/worker:1", default_redis_url="redis://redis.alchemist:6379/0")
BASE: dict[str, Any] = {"model": {"path": "/models/m"}}

POD = {
    "annotations": {"team": "search", "prometheus.io/port": "1"},
    "labels": {"cost-center": "42"},
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100", "h200"]}]}
                ]
            }
        }
    },
    "topologySpreadConstraints": [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": {"alchemist.dev/job": "chat"}},
        }
    ],
    "priorityClassName": "inference-high",
    "runtimeClassName": "nvidia",
    "imagePullSecrets": [{"name": "registry"}],
    "volumes": [{"name": "hf-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}}],
    "volumeMounts": [{"name": "hf-cache", "mountPath": "/cache/hf", "readOnly": True}],
}


def statefulset(**spec: Any) -> dict[str, Any]:
    built = desired_children(JOB, validate_job("chat", {**BASE, **spec}, CONFIG), CONFIG)
    return next(m for m in built if m["kind"] == "StatefulSet")


def config_map(**spec: Any) -> dict[str, str]:
    built = desired_children(JOB, validate_job("chat", {**BASE, **spec}, CONFIG), CONFIG)
    return next(m for m in built if m["kind"] == "ConfigMap")["data"]


def pod_of(sts: dict[str, Any]) -> dict[str, Any]:
    return sts["spec"]["template"]["spec"]


def env_of(sts: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod_of(sts)["containers"][0]["env"]}


def test_pod_options_pass_through_into_a_valid_statefulset() -> None:
    sts = statefulset(
        pod=POD,
        serviceAccountName="chat-worker",
        resources={"tolerations": [{"key": "gpu", "operator": "Exists"}], "nodeSelector": {"pool": "gpu"}},
    )
    validate_manifest(sts, {})
    template, pod = sts["spec"]["template"], pod_of(sts)
    assert template["metadata"]["labels"]["cost-center"] == "42"
    assert template["metadata"]["labels"]["alchemist.dev/job"] == "chat"  # the selector's labels are intact
    annotations = template["metadata"]["annotations"]
    assert annotations["team"] == "search" and annotations["prometheus.io/port"] == "8000"  # ours win
    assert pod["affinity"] == POD["affinity"]
    assert pod["topologySpreadConstraints"] == POD["topologySpreadConstraints"]  # replaces the default
    assert pod["priorityClassName"] == "inference-high" and pod["runtimeClassName"] == "nvidia"
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["serviceAccountName"] == "chat-worker"
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}] and pod["nodeSelector"] == {
        "pool": "gpu"
    }
    assert {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}} in pod["volumes"]
    mounts = pod["containers"][0]["volumeMounts"]
    assert {"name": "hf-cache", "mountPath": "/cache/hf", "readOnly": True} in mounts
    assert "dshm" in {v["name"] for v in pod["volumes"]}  # the operator's own volumes and mounts stay
    assert {"versions", "dshm"} <= {m["name"] for m in mounts}


def test_replicas_spread_across_nodes_by_default_and_freely_when_told() -> None:
    sts = statefulset(replicas=3)
    validate_manifest(sts, {})
    (spread,) = pod_of(sts)["topologySpreadConstraints"]
    assert (
        spread["topologyKey"] == "kubernetes.io/hostname" and spread["whenUnsatisfiable"] == "ScheduleAnyway"
    )
    assert (
        spread["labelSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    )  # only this job's pods
    assert "topologySpreadConstraints" not in pod_of(statefulset(pod={"topologySpreadConstraints": []}))


def test_the_stop_sequence_fits_in_the_grace_period() -> None:
    sts = statefulset()
    pod, container = pod_of(sts), pod_of(sts)["containers"][0]
    assert container["lifecycle"] == {"preStop": {"exec": {"command": ["sleep", "5"]}}}
    assert env_of(sts)["ALCHEMIST_SHUTDOWN_TIMEOUT_S"] == "120"
    assert pod["terminationGracePeriodSeconds"] == 5 + 120 + 15

    sts = statefulset(lifecycle={"preStopSeconds": 0, "drainSeconds": 600})
    validate_manifest(sts, {})
    assert "lifecycle" not in pod_of(sts)["containers"][0]
    assert env_of(sts)["ALCHEMIST_SHUTDOWN_TIMEOUT_S"] == "600"
    assert pod_of(sts)["terminationGracePeriodSeconds"] == 615


def test_torch_threads_follow_the_cpu_limit_else_the_request() -> None:
    sts = statefulset(resources={"cpu": "2", "cpuLimit": "3500m"})
    validate_manifest(sts, {})
    assert pod_of(sts)["containers"][0]["resources"]["limits"]["cpu"] == "3500m"
    assert env_of(sts)["ALCHEMIST_CPU_THREADS"] == {
        "resourceFieldRef": {"containerName": "worker", "resource": "limits.cpu", "divisor": "1"}
    }
    sts = statefulset(resources={"cpu": "2500m"})
    assert env_of(sts)["ALCHEMIST_CPU_THREADS"] == "3"
    assert "cpu" not in pod_of(sts)["containers"][0]["resources"]["limits"]
    own = statefulset(env=[{"name": "ALCHEMIST_CPU_THREADS", "value": "1"}])
    assert [e["name"] for e in pod_of(own)["containers"][0]["env"]].count("ALCHEMIST_CPU_THREADS") == 1
    # The job's own variables come after ours, so that they may refer to them ($(ALCHEMIST_CPU_THREADS)).
    names = [
        e["name"]
        for e in pod_of(statefulset(env=[{"name": "OMP_NUM_THREADS", "value": "$(ALCHEMIST_CPU_THREADS)"}]))[
            "containers"
        ][0]["env"]
    ]
    assert names.index("ALCHEMIST_CPU_THREADS") < names.index("OMP_NUM_THREADS")


LIVE_CHANGE = {
    "learningRate": 0.003,
    "weightDecay": 0.1,
    "batchSize": 2,
    "maxStaleness": 9,
    "stepIntervalSeconds": 30.0,
    "publishEverySteps": 3,
}


def test_training_hyper_parameters_and_rollout_change_no_pod_template() -> None:
    before = statefulset()
    after = statefulset(
        training=LIVE_CHANGE, rollout={"strategy": "Canary", "canary": {"minFeedback": 5}}, replicas=3
    )
    assert after["spec"]["template"] == before["spec"]["template"]  # no pod restarts, no model reload
    # New pods still start with the new values, and the workers get them through Redis.
    changed = {k for k, v in config_map(training=LIVE_CHANGE).items() if config_map()[k] != v}
    assert changed == LIVE_CONFIG_KEYS
    sent = live_settings(validate_job("chat", {**BASE, "training": LIVE_CHANGE}, CONFIG))
    assert sent.training == LiveTraining(
        learning_rate=0.003,
        weight_decay=0.1,
        batch_samples=2,
        max_staleness=9,
        step_interval_s=30.0,
        publish_every_steps=3,
    )


@pytest.mark.parametrize(
    "change",
    [
        {"training": {"lora": {"rank": 8}}},
        {"recording": {"sampleRate": 0.5}},
        {"serving": {"maxNumSeqs": 8}},
        {"lifecycle": {"drainSeconds": 30}},
        {"pod": {"priorityClassName": "batch"}},
    ],
)
def test_settings_read_at_start_roll_the_pods(change: dict[str, Any]) -> None:
    assert statefulset(**change)["spec"]["template"] != statefulset()["spec"]["template"]


def test_live_keys_are_exactly_the_live_settings_fields() -> None:
    """Each live ConfigMap key is one field the workers apply, and the other way round."""
    from alchemist_worker.continual.settings import ENV

    assert {ENV[name] for name in LiveTraining.model_fields} == LIVE_CONFIG_KEYS


@pytest.mark.parametrize(
    ("pod", "message"),
    [
        ({"labels": {"alchemist.dev/job": "other"}}, "spec.pod.labels must not set alchemist.dev/job"),
        ({"annotations": {CONFIG_HASH_ANNOTATION: "x"}}, "spec.pod.annotations must not set"),
        ({"volumes": [{"name": "versions", "emptyDir": {}}]}, "must not be named versions"),
        ({"volumes": [{"emptyDir": {}}]}, "every volume needs a name"),
        (
            {"volumes": [{"name": "a", "emptyDir": {}}, {"name": "a", "emptyDir": {}}]},
            "names a more than once",
        ),
        ({"volumeMounts": [{"name": "nope", "mountPath": "/x"}]}, "'nope' is not one of spec.pod.volumes"),
        (
            {
                "volumes": [{"name": "a", "emptyDir": {}}],
                "volumeMounts": [{"name": "a", "mountPath": "/dev/shm"}],
            },
            "/dev/shm is where the operator mounts",
        ),
        (
            {"volumes": [{"name": "a", "emptyDir": {}}], "volumeMounts": [{"name": "a", "mountPath": "rel"}]},
            "needs an absolute mountPath",
        ),
    ],
)
def test_pod_options_that_clash_with_the_operators_are_invalid(pod: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        validate_job("chat", {**BASE, "pod": pod}, CONFIG)


def test_a_cpu_limit_below_the_request_is_invalid() -> None:
    with pytest.raises(InvalidSpec, match=r"cpuLimit \(1\) must be at least spec.resources.cpu \(2\)"):
        validate_job("chat", {**BASE, "resources": {"cpu": "2", "cpuLimit": "1"}}, CONFIG)
