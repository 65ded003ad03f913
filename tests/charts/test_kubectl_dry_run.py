"""`kubectl apply --dry-run=client` of the CRDs, the rendered chart and the examples against a kmock API server.

kubectl needs a server for discovery even in client dry-run (offline it refuses); kmock plays that server, knowing
the built-in kinds and the kinds our CRDs and the chart add.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from kmock import KubernetesEmulator, ResourceInfo

from tests.charts.conftest import CRDS, EXAMPLES, Render
from tests.operator.conftest import register_resources


@pytest.fixture
async def api_server(kmock: KubernetesEmulator) -> KubernetesEmulator:
    register_resources(kmock)
    # kmock 0.8 names the core group version "/v1" in its discovery document; kubectl expects "v1".
    core = await (await kmock.get("/api/v1")).json()
    core["groupVersion"] = "v1"
    kmock["get /api/v1"] << core
    kmock.resources["kopf.dev/v1/clusterkopfpeerings"] = ResourceInfo(
        kind="ClusterKopfPeering",
        singular="clusterkopfpeering",
        namespaced=False,
        verbs={"get", "list", "watch", "patch"},
    )
    for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
        kmock.resources[f"monitoring.coreos.com/v1/{kind.lower()}s"] = ResourceInfo(
            kind=kind, singular=kind.lower(), namespaced=True, verbs={"get", "list", "create", "patch"}
        )
    return kmock


async def dry_run(
    kubectl: Path, server: KubernetesEmulator, *files: Path, stdin: str | None = None
) -> list[str]:
    """The lines kubectl prints, one per object; fails with kubectl's own message when it refuses."""
    args = [
        str(kubectl),
        f"--server={str(server.url).rstrip('/')}",
        "--token=test",
        "apply",
        "--dry-run=client",
        "--validate=false",
    ]
    for path in files:
        args += ["-f", str(path)]
    if stdin is not None:
        args += ["-f", "-"]
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"KUBECONFIG": "/dev/null", "HOME": "/tmp", "PATH": "/usr/bin:/bin"},
    )
    out, err = await asyncio.wait_for(process.communicate(stdin.encode() if stdin else None), timeout=120)
    assert process.returncode == 0, err.decode() + out.decode()
    return out.decode().splitlines()


async def test_crds_apply(kubectl: Path, api_server: KubernetesEmulator) -> None:
    lines = await dry_run(kubectl, api_server, *sorted(CRDS.glob("*.yaml")))
    assert sorted(lines) == [
        "customresourcedefinition.apiextensions.k8s.io/clusterkopfpeerings.kopf.dev created (dry run)",
        "customresourcedefinition.apiextensions.k8s.io/continuallearningjobs.alchemist.dev created (dry run)",
        "customresourcedefinition.apiextensions.k8s.io/kopfpeerings.kopf.dev created (dry run)",
    ]


@pytest.mark.parametrize(
    "values",
    [
        None,
        {
            "watchNamespaces": ["team-a"],
            "serviceMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True},
            "redis": {"enabled": False},
        },
    ],
    ids=["default", "namespaced"],
)
async def test_rendered_chart_applies(
    kubectl: Path, api_server: KubernetesEmulator, render: Render, values: dict[str, object] | None
) -> None:
    import yaml

    docs = render(values)
    lines = await dry_run(kubectl, api_server, stdin=yaml.safe_dump_all(docs))
    assert len(lines) == len(docs)
    assert all(line.endswith("created (dry run)") for line in lines), lines
    assert any(line.startswith("deployment.apps/alc-alchemist-operator") for line in lines)


async def test_examples_apply(kubectl: Path, api_server: KubernetesEmulator) -> None:
    lines = await dry_run(kubectl, api_server, *sorted(EXAMPLES.glob("*.yaml")))
    assert "continuallearningjob.alchemist.dev/assistant created (dry run)" in lines
    assert "continuallearningjob.alchemist.dev/smollm2 created (dry run)" in lines
    assert "secret/assistant-redis created (dry run)" in lines
