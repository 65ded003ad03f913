"""The Helm chart with the real helm binary: lint, render with default and other values, validate every rendered
manifest offline, and check what the operator is allowed to do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from alchemist_operator.cluster_api import PLURALS

from tests.charts.conftest import CHART, CRDS, Render, run
from tests.charts.manifest_validation import crd_schemas, validate_manifest

NON_DEFAULT: dict[str, Any] = {
    "replicaCount": 1,
    "watchNamespaces": ["team-a", "team-b"],
    "peering": {"name": "alchemist-prod"},
    "image": {"repository": "registry.example/alchemist/operator", "tag": "1.2.3", "pullPolicy": "Always"},
    "worker": {"image": {"repository": "registry.example/alchemist/worker", "tag": "1.2.3-cu128"}},
    "redis": {"enabled": False, "existingSecret": "feedback-redis", "existingSecretKey": "redis-url"},
    "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prometheus"}},
    "verbose": True,
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "control", "operator": "Exists", "effect": "NoSchedule"}],
    "podAnnotations": {"team": "ml-platform"},
}
PERSISTENT_REDIS: dict[str, Any] = {
    "redis": {"enabled": True, "persistence": {"enabled": True, "size": "20Gi"}}
}
EPHEMERAL_REDIS: dict[str, Any] = {
    "redis": {"enabled": True, "persistence": {"enabled": False}, "auth": {"password": "given-pw"}},
    "networkPolicy": {"enabled": False},
}
EXTERNAL_REDIS: dict[str, Any] = {"redis": {"enabled": False, "externalUrl": "rediss://redis.example:6380/2"}}


def by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        out.setdefault(doc["kind"], []).append(doc)
    return out


def operator_deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator"))


def container_env(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_chart_crds_are_identical_to_the_crds_folder() -> None:
    ours = {p.name: p.read_bytes() for p in CRDS.glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert ours and chart == ours, "copy crds/*.yaml into charts/alchemist/crds/"


@pytest.mark.parametrize(
    "values",
    [None, NON_DEFAULT, PERSISTENT_REDIS, EXTERNAL_REDIS, EPHEMERAL_REDIS],
    ids=["default", "namespaced", "persistent-redis", "external-redis", "ephemeral-redis"],
)
def test_helm_lint(helm: Path, tmp_path: Path, values: dict[str, Any] | None) -> None:
    args: list[str | Path] = [helm, "lint", "--strict", CHART]
    if values is not None:
        (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
        args += ["--values", tmp_path / "values.yaml"]
    result = run(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_default_render(render: Render) -> None:
    docs = render()
    kinds = by_kind(docs)
    assert sorted(kinds) == [
        "ClusterKopfPeering",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",  # the Grafana dashboard
        "CustomResourceDefinition",
        "Deployment",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "ServiceAccount",
    ]
    assert {c["metadata"]["name"] for c in kinds["CustomResourceDefinition"]} == {
        "continuallearningjobs.alchemist.dev",
        "kopfpeerings.kopf.dev",
        "clusterkopfpeerings.kopf.dev",
    }
    deployment = operator_deployment(docs)
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "alchemist/operator:0.1.0"
    assert container["args"] == [
        "--peering=alchemist",
        "--worker-image=alchemist/worker:0.1.0",
        "--monitor-interval=10",
        "--liveness=http://0.0.0.0:8080/healthz",
        "--metrics-port=8081",
        "--log-format=text",
    ]
    assert (
        container_env(deployment)["ALCHEMIST_DEFAULT_REDIS_URL"]
        == "redis://alc-alchemist-redis.alchemist.svc:6379/0"
    )
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["resources"]["limits"]["memory"] == "256Mi"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["serviceAccountName"] == "alc-alchemist"
    redis = next(d for d in kinds["Deployment"] if d["metadata"]["name"] == "alc-alchemist-redis")
    assert redis["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    (peering,) = kinds["ClusterKopfPeering"]
    assert peering["metadata"]["name"] == "alchemist"


def test_namespaced_render_with_external_redis_and_service_monitor(render: Render) -> None:
    docs = render(NON_DEFAULT)
    kinds = by_kind(docs)
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    assert "PodDisruptionBudget" not in kinds  # a single replica
    assert sorted(r["metadata"]["namespace"] for r in kinds["Role"]) == ["team-a", "team-b"]
    assert sorted(r["metadata"]["namespace"] for r in kinds["RoleBinding"]) == ["team-a", "team-b"]
    assert {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in kinds["KopfPeering"]} == {
        ("team-a", "alchemist-prod"),
        ("team-b", "alchemist-prod"),
    }
    assert [d["metadata"]["name"] for d in kinds["Deployment"]] == [
        "alc-alchemist-operator"
    ]  # no in-chart Redis
    deployment = operator_deployment(docs)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example/alchemist/operator:1.2.3"
    assert "--namespace=team-a" in container["args"] and "--namespace=team-b" in container["args"]
    assert "--peering=alchemist-prod" in container["args"] and "--verbose" in container["args"]
    assert "--worker-image=registry.example/alchemist/worker:1.2.3-cu128" in container["args"]
    assert container_env(deployment)["ALCHEMIST_DEFAULT_REDIS_URL"] == {
        "secretKeyRef": {"name": "feedback-redis", "key": "redis-url"}
    }
    (monitor,) = kinds["ServiceMonitor"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    assert monitor["spec"]["selector"]["matchLabels"]["alchemist.dev/service"] == "headless"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == ("http", "/metrics", "15s")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


def test_redis_variants(render: Render) -> None:
    persistent = by_kind(render(PERSISTENT_REDIS))
    (claim,) = persistent["PersistentVolumeClaim"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    external = render(EXTERNAL_REDIS)
    assert (
        container_env(operator_deployment(external))["ALCHEMIST_DEFAULT_REDIS_URL"]
        == "rediss://redis.example:6380/2"
    )
    assert not any(d["kind"] == "Service" for d in external)


@pytest.mark.parametrize(
    "values",
    [None, NON_DEFAULT, PERSISTENT_REDIS, EXTERNAL_REDIS, EPHEMERAL_REDIS],
    ids=["default", "namespaced", "persistent-redis", "external-redis", "ephemeral-redis"],
)
def test_every_rendered_manifest_is_valid_offline(
    render: Render, crd_docs: list[dict[str, Any]], values: dict[str, Any] | None
) -> None:
    docs = render(values)
    custom = crd_schemas(crd_docs)
    for doc in docs:
        validate_manifest(doc, custom)


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"replicaCount": 0}, "replicaCount"),
        ({"watchNamespaces": ["Not_A_Namespace"]}, "watchNamespaces"),
        ({"redis": {"enabled": False, "externalUrl": "http://not-redis"}}, "externalUrl"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_values_schema_rejects_bad_values(
    helm: Path, tmp_path: Path, values: dict[str, Any], complaint: str
) -> None:
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    result = run(helm, "template", "alc", CHART, "--values", tmp_path / "values.yaml")
    assert result.returncode != 0
    assert complaint in result.stderr


def test_rbac_is_least_privilege(render: Render) -> None:
    """Only what the operator's API layer and kopf use; nothing it could delete; Secrets read-only."""
    (role,) = by_kind(render())["ClusterRole"]
    granted = {
        (group, resource): set(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert not {"delete", "deletecollection", "update", "escalate", "bind", "impersonate"} & set(
            rule["verbs"]
        )
    # Secrets: read (the ones jobs name) and written (the Redis password beside each job), never listed.
    assert granted[("", "secrets")] == {"get", "create", "patch"}
    assert granted[("", "pods")] == {"get", "list"}  # read for their failures, never written
    # Every kind the operator applies is creatable and patchable, and nothing else is.
    applied = {
        (api.split("/")[0] if "/" in api else "", plural)
        for (api, kind), plural in PLURALS.items()
        if kind not in ("Pod", "ContinualLearningJob")
    }
    writable = {key for key, verbs in granted.items() if "create" in verbs and key[1] != "events"}
    assert writable == applied
    assert granted[("alchemist.dev", "continuallearningjobs")] == {"get", "list", "watch", "patch"}
    assert granted[("alchemist.dev", "continuallearningjobs/status")] == {"get", "patch"}
    assert granted[("kopf.dev", "clusterkopfpeerings")] == {"get", "list", "watch", "patch"}
