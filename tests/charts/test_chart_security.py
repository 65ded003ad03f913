"""The chart's security defaults: a Redis password in a Secret (generated once and kept, or given), Redis data on
a volume with an append-only file, NetworkPolicies, and no secret in a ConfigMap or a plain env value."""

from __future__ import annotations

import base64
import json
import os
import string
from pathlib import Path
from typing import Any

import pytest
import yaml
from kmock import KubernetesEmulator

from tests.charts.conftest import CHART, Render, load_all, run
from tests.charts.test_chart import by_kind, container_env, operator_deployment
from tests.charts.test_kubectl_dry_run import api_server  # noqa: F401  (fixture)


def redis_deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-redis"))


def password_of(docs: list[dict[str, Any]]) -> str:
    (secret,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "alc-alchemist-redis"]
    return base64.b64decode(secret["data"]["password"]).decode()


def assert_nowhere_in_clear(docs: list[dict[str, Any]], password: str) -> None:
    """Only the Secret holds the password; ConfigMaps, args and env values never do."""
    for doc in docs:
        if doc["kind"] == "Secret":
            continue
        assert password not in json.dumps(doc), (
            f"the password is in the {doc['kind']} {doc['metadata']['name']}"
        )


def test_default_redis_has_a_generated_password_and_persistence(render: Render) -> None:
    docs = render()
    password = password_of(docs)
    assert len(password) == 32 and set(password) <= set(string.ascii_letters + string.digits)
    assert password != password_of(render()), "a fresh install draws a fresh password"
    assert_nowhere_in_clear(docs, password)

    redis = redis_deployment(docs)["spec"]["template"]["spec"]
    (container,) = redis["containers"]
    assert container["args"][:2] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert container["args"][2:] == ["--appendonly", "yes"]
    ref = {"secretKeyRef": {"name": "alc-alchemist-redis", "key": "password"}}
    assert {e["name"]: e["valueFrom"] for e in container["env"]} == {
        "REDIS_PASSWORD": ref,
        "REDISCLI_AUTH": ref,  # the readiness probe's redis-cli authenticates too
    }
    (claim,) = by_kind(docs)["PersistentVolumeClaim"]
    assert redis["volumes"] == [
        {"name": "data", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
    ]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # The operator reads the password from the Secret, for itself and the jobs' copies.
    assert container_env(operator_deployment(docs))["ALCHEMIST_DEFAULT_REDIS_PASSWORD"] == ref


def test_a_given_password_and_no_persistence(render: Render) -> None:
    docs = render({"redis": {"auth": {"password": "given-pw"}, "persistence": {"enabled": False}}})
    assert password_of(docs) == "given-pw"
    assert_nowhere_in_clear(docs, "given-pw")
    (container,) = redis_deployment(docs)["spec"]["template"]["spec"]["containers"]
    assert container["args"][2:] == ["--save", "", "--appendonly", "no"]
    assert "PersistentVolumeClaim" not in by_kind(docs)


def test_an_existing_password_secret_is_used_for_redis_and_the_operator(render: Render) -> None:
    docs = render({"redis": {"auth": {"existingSecret": "my-redis", "existingSecretKey": "pw"}}})
    assert not any(d["kind"] == "Secret" for d in docs)
    ref = {"secretKeyRef": {"name": "my-redis", "key": "pw"}}
    assert container_env(operator_deployment(docs))["ALCHEMIST_DEFAULT_REDIS_PASSWORD"] == ref
    (container,) = redis_deployment(docs)["spec"]["template"]["spec"]["containers"]
    assert {e["name"]: e["valueFrom"] for e in container["env"]}["REDIS_PASSWORD"] == ref


def test_values_schema_refuses_a_password_that_cannot_go_in_a_url(helm: Path, tmp_path: Path) -> None:
    (tmp_path / "values.yaml").write_text(yaml.safe_dump({"redis": {"auth": {"password": "a@b/c"}}}))
    result = run(helm, "template", "alc", CHART, "--values", tmp_path / "values.yaml")
    assert result.returncode != 0 and "password" in result.stderr


async def test_an_upgrade_keeps_the_password_it_finds(
    helm: Path,
    tmp_path: Path,
    api_server: KubernetesEmulator,  # noqa: F811
) -> None:
    """`lookup` against a server that holds the Secret from the first install (helm's server dry run)."""
    kept = base64.b64encode(b"kept-from-install").decode()
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {  # as the first install left it, owned by the release
            "name": "alc-alchemist-redis",
            "namespace": "alchemist",
            "labels": {"app.kubernetes.io/managed-by": "Helm"},
            "annotations": {
                "meta.helm.sh/release-name": "alc",
                "meta.helm.sh/release-namespace": "alchemist",
            },
        },
        "data": {"password": kept},
    }
    # kmock reports Kubernetes 1.26; the chart needs 1.29 or newer.
    api_server["get /version"] << {
        "major": "1",
        "minor": "30",
        "gitVersion": "v1.30.0",
        "platform": "linux/amd64",
    }
    response = await api_server.post("/api/v1/namespaces/alchemist/secrets", json=secret)
    assert response.status in (200, 201), await response.text()
    kubeconfig = tmp_path / "kubeconfig"
    server = str(api_server.url).rstrip("/")
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "k", "cluster": {"server": server}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "k", "context": {"cluster": "k", "user": "u"}}],
                "current-context": "k",
            }
        )
    )
    import asyncio

    process = await asyncio.create_subprocess_exec(
        str(helm), "template", "alc", str(CHART), "-n", "alchemist", "--dry-run=server", "--disable-openapi-validation",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path)},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, err.decode()
    assert password_of(load_all(out.decode())) == "kept-from-install"


def test_network_policies(render: Render) -> None:
    docs = render({"watchNamespaces": ["team-a", "team-b"]})
    policies = {
        (p["metadata"]["namespace"], p["metadata"]["name"]): p["spec"] for p in by_kind(docs)["NetworkPolicy"]
    }
    assert set(policies) == {
        ("alchemist", "alc-alchemist-redis"),
        ("alchemist", "alc-alchemist-operator"),
        ("team-a", "alc-alchemist-workers"),
        ("team-b", "alc-alchemist-workers"),
    }
    redis = policies[("alchemist", "alc-alchemist-redis")]
    (rule,) = redis["ingress"]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    operator, workers = rule["from"]
    assert operator["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    assert workers["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "alchemist-worker"
    assert workers["namespaceSelector"]["matchExpressions"][0]["values"] == ["team-a", "team-b"]
    worker_policy = policies[("team-a", "alc-alchemist-workers")]
    assert worker_policy["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "alchemist-worker"
    serving, group = worker_policy["ingress"]
    assert serving == {"ports": [{"port": "http", "protocol": "TCP"}]}
    # Any port, but only from workers: the replicas' data-parallel group (rendezvous store, gloo/NCCL).
    assert group == {"from": [{"podSelector": {"matchLabels": worker_policy["podSelector"]["matchLabels"]}}]}
    assert "NetworkPolicy" not in by_kind(render({"networkPolicy": {"enabled": False}}))


@pytest.mark.parametrize("values", [None, {"watchNamespaces": ["team-a"]}], ids=["clusterwide", "namespaced"])
def test_worker_labels_in_policies_match_the_operators_pods(
    render: Render, values: dict[str, Any] | None
) -> None:
    """The policies select workers by labels the operator puts on every job's pods."""
    from alchemist_operator.naming import JobRef

    labels = JobRef("team-a", "chat", "uid").labels()
    redis = next(
        p for p in by_kind(render(values))["NetworkPolicy"] if p["metadata"]["name"].endswith("-redis")
    )
    selector = redis["spec"]["ingress"][0]["from"][1]["podSelector"]["matchLabels"]
    assert selector.items() <= labels.items()
