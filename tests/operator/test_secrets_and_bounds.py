"""Secrets reach the workers by reference only (API key files, the Redis password), env valueFrom passes
through, and the CRD's schema bounds what no worker can use."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import jsonschema
import pytest
from alchemist_operator.children import desired_children
from alchemist_operator.job_spec import InvalidSpec, parse_job_spec
from alchemist_operator.naming import JobRef
from alchemist_operator.operator_config import OperatorConfig
from alchemist_operator.preflight import referenced_secrets
from alchemist_operator.worker_env import url_with_password_reference

from tests.charts.manifest_validation import crd_schemas, validate_manifest
from tests.operator.conftest import job_manifest

JOB = JobRef(namespace="team-a", name="chat", uid="1234")
PASSWORD = "s3cret-default-pw"
CONFIG = OperatorConfig(
    worker_image="alchemist/worker:1",
    default_redis_url="redis://redis.alchemist:6379/0",
    default_redis_password=PASSWORD,
)


def children(config: OperatorConfig = CONFIG, **spec: Any) -> dict[str, dict[str, Any]]:
    built = desired_children(JOB, parse_job_spec({"model": {"path": "/models/m"}, **spec}), config)
    for manifest in built:
        validate_manifest(manifest, {})
    return {f"{m['kind']}/{m['metadata']['name']}": m for m in built}


def pod(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return objs["StatefulSet/chat"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def env(objs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return pod(objs)["containers"][0]["env"]  # type: ignore[no-any-return]


def test_api_key_secrets_are_mounted_as_files_whose_paths_are_configured() -> None:
    objs = children(
        auth={
            "apiKeysSecret": {"name": "chat-keys", "key": "users"},
            "adminKeysSecret": {"name": "chat-admin", "key": "admins"},
        }
    )
    data = objs["ConfigMap/chat-config"]["data"]
    assert data["ALCHEMIST_API_KEYS_FILE"] == "/etc/alchemist/auth/api/keys"
    assert data["ALCHEMIST_ADMIN_KEYS_FILE"] == "/etc/alchemist/auth/admin/keys"
    volumes = {v["name"]: v for v in pod(objs)["volumes"]}
    assert volumes["api-keys"]["secret"] == {
        "secretName": "chat-keys",
        "items": [{"key": "users", "path": "keys"}],
        "defaultMode": 0o440,
    }
    assert volumes["admin-keys"]["secret"]["secretName"] == "chat-admin"
    mounts = {m["name"]: m for m in pod(objs)["containers"][0]["volumeMounts"]}
    assert mounts["api-keys"] == {
        "name": "api-keys",
        "mountPath": "/etc/alchemist/auth/api",
        "readOnly": True,
    }
    # Without auth: no key files, no variables (the worker's API is open, as before).
    plain = children()
    assert "ALCHEMIST_API_KEYS_FILE" not in plain["ConfigMap/chat-config"]["data"]
    assert "api-keys" not in {v["name"] for v in pod(plain)["volumes"]}


def test_the_default_redis_password_is_copied_beside_the_job_and_referenced_never_written_in_clear() -> None:
    objs = children()
    secret = objs["Secret/chat-default-redis"]
    assert base64.b64decode(secret["data"]["password"]).decode() == PASSWORD
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "1234"
    for name, manifest in objs.items():
        if not name.startswith("Secret/"):
            assert PASSWORD not in json.dumps(manifest), name
    assert env(objs)[2:4] == [
        {
            "name": "ALCHEMIST_REDIS_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": "chat-default-redis", "key": "password"}},
        },
        {
            "name": "ALCHEMIST_REDIS_URL",
            "value": "redis://:$(ALCHEMIST_REDIS_PASSWORD)@redis.alchemist:6379/0",
        },
    ]
    assert PASSWORD not in repr(CONFIG)  # nor in a logged configuration


def test_a_jobs_own_password_secret_and_its_own_redis() -> None:
    objs = children(
        feedback={"redisUrl": "rediss://user@redis.team-a:6380/1"},
        redis={"passwordSecret": {"name": "team-redis"}},
    )
    assert (
        "Secret/chat-default-redis" not in objs
    )  # the default Redis's password stays with the default Redis
    by_name = {e["name"]: e for e in env(objs)}
    assert by_name["ALCHEMIST_REDIS_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "team-redis", "key": "password"}
    }
    assert (
        by_name["ALCHEMIST_REDIS_URL"]["value"]
        == "rediss://user:$(ALCHEMIST_REDIS_PASSWORD)@redis.team-a:6380/1"
    )
    # A URL from a Secret is passed by reference, with the password beside it.
    from_secret = {e["name"]: e for e in env(children(feedback={"redisSecretRef": {"name": "url"}}))}
    assert from_secret["ALCHEMIST_REDIS_URL"]["valueFrom"] == {"secretKeyRef": {"name": "url", "key": "url"}}
    assert "ALCHEMIST_REDIS_PASSWORD" not in from_secret  # an own Redis without passwordSecret: none copied
    # An operator without a default password adds nothing.
    bare = children(config=OperatorConfig(worker_image="w", default_redis_url="redis://r:6379/0"))
    names = [e["name"] for e in env(bare)]
    assert "ALCHEMIST_REDIS_PASSWORD" not in names and names.count("ALCHEMIST_REDIS_URL") == 1


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://r:6379/0", "redis://:$(ALCHEMIST_REDIS_PASSWORD)@r:6379/0"),
        (
            "rediss://r:6380/0?ssl_cert_reqs=none",
            "rediss://:$(ALCHEMIST_REDIS_PASSWORD)@r:6380/0?ssl_cert_reqs=none",
        ),
        ("redis://app@r:6379", "redis://app:$(ALCHEMIST_REDIS_PASSWORD)@r:6379"),
        ("redis://app:own@r:6379", "redis://app:own@r:6379"),  # a URL with its own password wins
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_password_reference_in_urls(url: str, expected: str) -> None:
    assert url_with_password_reference(url) == expected


def test_env_value_from_passes_through_to_the_pod() -> None:
    extra = [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
        {
            "name": "REGION",
            "valueFrom": {"configMapKeyRef": {"name": "site", "key": "region", "optional": True}},
        },
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "PLAIN", "value": "1"},
        {"name": "EMPTY"},
    ]
    built = env(children(env=extra))
    assert [e for e in built if e["name"] in {x["name"] for x in extra}] == extra
    uses = referenced_secrets(parse_job_spec({"model": {"path": "/m"}, "env": extra}))
    assert [(u.name, u.key, u.field) for u in uses] == [("hf", "token", "spec.env HF_TOKEN")]


def test_every_secret_the_job_names_is_checked() -> None:
    spec = parse_job_spec(
        {
            "model": {"path": "/m"},
            "feedback": {"redisSecretRef": {"name": "r"}},
            "redis": {"passwordSecret": {"name": "p", "key": "pw"}},
            "auth": {
                "apiKeysSecret": {"name": "k", "key": "api"},
                "adminKeysSecret": {"name": "k", "key": "admin"},
            },
        }
    )
    assert [(u.name, u.key) for u in referenced_secrets(spec)] == [
        ("r", "url"),
        ("p", "pw"),
        ("k", "api"),
        ("k", "admin"),
    ]


def schema_errors(crd: dict[str, Any], **spec: Any) -> list[str]:
    manifest = job_manifest(**spec)
    validator = jsonschema.Draft4Validator(crd_schemas([crd])[(manifest["apiVersion"], manifest["kind"])])
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(manifest)]


@pytest.mark.parametrize(
    ("spec", "where"),
    [
        ({"replicas": 65}, "replicas"),
        ({"resources": {"gpus": 2}}, "gpus"),
        ({"serving": {"kvCacheMemory": 0}}, "kvCacheMemory"),
        ({"serving": {"kvCacheMemory": "0Gi"}}, "kvCacheMemory"),
        ({"serving": {"kvCacheMemory": "0.0"}}, "kvCacheMemory"),
        ({"env": [{"name": "A", "valueFrom": {}}]}, "valueFrom"),
        (
            {
                "env": [
                    {
                        "name": "A",
                        "valueFrom": {
                            "fieldRef": {"fieldPath": "x"},
                            "secretKeyRef": {"name": "s", "key": "k"},
                        },
                    }
                ]
            },
            "valueFrom",
        ),
        ({"env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s"}}}]}, "secretKeyRef"),
        ({"auth": {"apiKeysSecret": {"name": "k"}}}, "apiKeysSecret"),
    ],
)
def test_the_schema_rejects(crd: dict[str, Any], spec: dict[str, Any], where: str) -> None:
    errors = schema_errors(crd, **spec)
    assert errors and any(where in e for e in errors), errors


@pytest.mark.parametrize(
    "spec",
    [
        {"replicas": 64, "resources": {"gpus": 1}},
        {"resources": {"gpus": 0}, "serving": {"kvCacheMemory": "0.5Gi"}},
        {"serving": {"kvCacheMemory": 1}},
        {"serving": {"kvCacheMemory": "512Mi"}},
        {"env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]},
        {"redis": {"passwordSecret": {"name": "p"}}, "auth": {"adminKeysSecret": {"name": "a", "key": "k"}}},
    ],
)
def test_the_schema_accepts(crd: dict[str, Any], spec: dict[str, Any]) -> None:
    assert schema_errors(crd, **spec) == []
    parse_job_spec({"model": {"path": "/m"}, **copy.deepcopy(spec)})  # and the operator's model agrees


def test_the_model_rejects_what_the_schema_does() -> None:
    for bad in ({"replicas": 65}, {"serving": {"kvCacheMemory": "0Gi"}}, {"serving": {"kvCacheMemory": 0}}):
        with pytest.raises(InvalidSpec):
            parse_job_spec({"model": {"path": "/m"}, **bad})


def test_cel_rules_name_gpus_and_value_from(crd: dict[str, Any]) -> None:
    """The API server's messages (CEL runs there, not here): what they say and where they sit."""
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    (gpus_rule,) = spec["resources"]["x-kubernetes-validations"]
    assert gpus_rule["rule"] == "self.gpus <= 1" and "one GPU per pod" in gpus_rule["message"]
    (env_rule,) = spec["env"]["items"]["x-kubernetes-validations"]
    assert env_rule["rule"] == "!(has(self.value) && has(self.valueFrom))"
