"""Upgrading from the previous chart release: what `helm upgrade` would refuse, what the CRD upgrade must keep,
and the current operator taking over a job the previous release created, against kmock.

Helm installs `crds/` once and never upgrades them, so the documented path (docs/job-lifecycle.md) applies the new
CRDs first, then upgrades the release. The previous release is read from git history (`PREVIOUS_RELEASE`).
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from alchemist_operator.job_spec import parse_job_spec
from alchemist_operator.operator_config import OperatorConfig
from kmock import KubernetesEmulator

from tests.charts.conftest import CHART, REPO, load_all, run
from tests.charts.manifest_validation import crd_schemas, validate_manifest
from tests.operator import conftest as operator_fixtures
from tests.operator.conftest import JOBS, eventually, has_object, running_operator

PREVIOUS_RELEASE = "1a13f0668a96868b980b337498561e480de2fee2"  # chart 0.1.0
# What the API server refuses to change in place, per kind: helm upgrade would fail on it.
IMMUTABLE: dict[str, tuple[tuple[str, ...], ...]] = {
    "Deployment": (("spec", "selector"),),
    "StatefulSet": (
        ("spec", "selector"),
        ("spec", "serviceName"),
        ("spec", "volumeClaimTemplates"),
        ("spec", "podManagementPolicy"),
    ),
    "Service": (("spec", "clusterIP"),),
    "PersistentVolumeClaim": (("spec", "accessModes"), ("spec", "storageClassName"), ("spec", "volumeName")),
    "RoleBinding": (("roleRef",),),
    "ClusterRoleBinding": (("roleRef",),),
    "Job": (("spec", "template"),),
}
NS = "default"
kube = operator_fixtures.kube  # the operator tests' kmock API and operator configuration, as fixtures here
operator_config = operator_fixtures.operator_config


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's chart, CRDs and examples, unpacked from git."""
    out = tmp_path_factory.mktemp("previous")
    archive = out / "previous.tar"
    result = run("git", "-C", REPO, "archive", "-o", archive, PREVIOUS_RELEASE, "charts", "crds", "examples")
    if result.returncode != 0:
        pytest.skip(f"git history without {PREVIOUS_RELEASE} (a shallow clone?): {result.stderr.strip()}")
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    return out


def template(helm: Path, chart: Path) -> list[dict[str, Any]]:
    result = run(helm, "template", "alc", chart, "--namespace", "alchemist", "--include-crds")
    assert result.returncode == 0, result.stderr
    return load_all(result.stdout)


def key(doc: dict[str, Any]) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


def dig(doc: dict[str, Any], path: tuple[str, ...]) -> Any:
    for part in path:
        doc = doc.get(part) if isinstance(doc, dict) else None  # type: ignore[assignment]
    return doc


def version_tuple(chart: Path) -> tuple[int, ...]:
    version = yaml.safe_load((chart / "Chart.yaml").read_text())["version"]
    return tuple(int(p) for p in str(version).split("-")[0].split("."))


def test_helm_upgrade_changes_no_immutable_field(helm: Path, previous: Path) -> None:
    old = {key(d): d for d in template(helm, previous / "charts" / "alchemist")}
    new = {key(d): d for d in template(helm, CHART)}
    kept = set(old) & set(new)
    assert any(k[0] == "Deployment" for k in kept)  # the operator's Deployment is upgraded in place
    changed = [
        f"{kind} {name}: {'.'.join(path)}"
        for (kind, namespace, name) in sorted(kept)
        for path in IMMUTABLE.get(kind, ())
        if dig(old[kind, namespace, name], path) != dig(new[kind, namespace, name], path)
    ]
    assert changed == []
    assert version_tuple(CHART) > version_tuple(previous / "charts" / "alchemist")


def schema_problems(old: dict[str, Any], new: dict[str, Any], path: str) -> list[str]:
    """What an object valid under `old` could fail under `new`: a field gone or retyped, a new requirement, an
    enum value dropped, a bound tightened."""
    problems: list[str] = []
    if old.get("type") != new.get("type") or old.get("x-kubernetes-int-or-string") != new.get(
        "x-kubernetes-int-or-string"
    ):
        problems.append(f"{path}: type {old.get('type')} became {new.get('type')}")
    if set(new.get("required", [])) - set(old.get("required", [])):
        problems.append(
            f"{path}: newly required {sorted(set(new['required']) - set(old.get('required', [])))}"
        )
    if ("enum" in new and set(old.get("enum", [])) - set(new["enum"])) or (
        "enum" in new and "enum" not in old
    ):
        problems.append(f"{path}: enum {old.get('enum')} became {new['enum']}")
    for bound, tighter in (("minimum", max), ("maximum", min), ("minLength", max), ("maxLength", min)):
        if bound in new and (bound not in old or tighter(old[bound], new[bound]) != old[bound]):
            problems.append(f"{path}: {bound} {old.get(bound)} became {new[bound]}")
    for name, child in (old.get("properties") or {}).items():
        if name not in (new.get("properties") or {}):
            if not new.get("x-kubernetes-preserve-unknown-fields"):
                problems.append(f"{path}.{name}: removed (stored objects would lose it)")
            continue
        problems += schema_problems(child, new["properties"][name], f"{path}.{name}")
    if "items" in old and "items" in new:
        problems += schema_problems(old["items"], new["items"], f"{path}[]")
    return problems


def crd_by_name(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "CustomResourceDefinition"}


def test_the_new_crds_accept_every_object_the_previous_ones_stored(helm: Path, previous: Path) -> None:
    old = crd_by_name(template(helm, previous / "charts" / "alchemist"))
    new = crd_by_name(template(helm, CHART))
    assert set(old) <= set(new)
    problems: list[str] = []
    for name, old_crd in old.items():
        new_versions = {v["name"]: v for v in new[name]["spec"]["versions"]}
        for version in old_crd["spec"]["versions"]:
            kept = new_versions.get(version["name"])
            if kept is None or not kept["served"]:
                problems.append(f"{name}: version {version['name']} is no longer served")
                continue
            problems += schema_problems(
                version["schema"]["openAPIV3Schema"],
                kept["schema"]["openAPIV3Schema"],
                f"{name}/{version['name']}",
            )
        stored = [v["name"] for v in new[name]["spec"]["versions"] if v["storage"]]
        old_stored = [v["name"] for v in old_crd["spec"]["versions"] if v["storage"]]
        if stored != old_stored:
            problems.append(
                f"{name}: storage version {old_stored} became {stored} (needs a storage migration)"
            )
    assert problems == []


async def test_the_current_operator_takes_over_a_job_of_the_previous_release(
    kube: KubernetesEmulator, operator_config: OperatorConfig, helm: Path, previous: Path
) -> None:
    """Previous release installed with a job; then the documented upgrade: the new CRDs, then the new operator.
    (The finalizer the previous operator put on jobs is removed by the new one: test_deletion.py. It is left out
    here because kmock never bumps resourceVersion, so kopf's guarded removal can be replayed and fail.)"""
    for doc in template(helm, previous / "charts" / "alchemist"):
        if doc["kind"] == "CustomResourceDefinition":
            response = await kube.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=doc)
            assert response.status == 200
    (job,) = load_all((previous / "examples" / "cpu-smollm2.yaml").read_text())
    job["metadata"].update(uid="uid-smollm2", generation=1, resourceVersion="1")
    old_crds = crd_by_name(template(helm, previous / "charts" / "alchemist"))
    validate_manifest(job, crd_schemas(old_crds.values()))
    path = f"/apis/alchemist.dev/v1alpha1/namespaces/{NS}/continuallearningjobs"
    assert (await kube.post(path, json=job)).status == 200

    # The upgrade: `kubectl apply --server-side -f charts/alchemist/crds/`, then `helm upgrade`.
    new_crds = crd_by_name(template(helm, CHART))
    for name, crd in new_crds.items():
        url = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
        assert (await kube.delete(url)).status == 200
        assert (
            await kube.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=crd)
        ).status == 200
    stored = kube.objects[JOBS, NS, "smollm2"].raw
    validate_manifest(stored, crd_schemas(new_crds.values()))  # what the API server keeps still validates
    parse_job_spec(stored["spec"])  # and the current operator reads it, new fields at their defaults

    config = OperatorConfig(
        worker_image=operator_config.worker_image,
        default_redis_url=operator_config.default_redis_url,
        monitor_interval_seconds=0.2,
        namespaces=(NS,),
        standalone=True,
        liveness_endpoint=None,
    )
    async with running_operator(config):
        await eventually(
            lambda: has_object(kube, "apps/v1/statefulsets", NS, "smollm2"), what="the StatefulSet"
        )
        await eventually(
            lambda: any(
                c["type"] == "Valid" and c["status"] == "True"
                for c in (kube.objects[JOBS, NS, "smollm2"].get("status") or {}).get("conditions", [])
            ),
            what="the job accepted",
        )
    sts = kube.objects["apps/v1/statefulsets", NS, "smollm2"].raw
    validate_manifest(sts, {})
    assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 5 + 120 + 15
    assert (await kube.delete(f"{path}/smollm2")).status == 200 and not has_object(kube, JOBS, NS, "smollm2")
