"""The chart's dashboard, alerts and monitors: rendered by the real helm, validated offline, every query parsed by
a PromQL parser, and every metric they name one that the worker or the operator really registers."""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator
from typing import Any

import promql_parser
import pytest
from alchemist_operator.job_metrics import JobMetrics
from alchemist_worker.api.metrics import ServingMetrics
from alchemist_worker.continual.duties import ControlDuties
from alchemist_worker.continual.metrics import TrainingMetrics
from alchemist_worker.engine.serving_engine import EngineStats
from alchemist_worker.evaluation.gate_metrics import GateMetrics
from prometheus_client import CollectorRegistry

from tests.charts.conftest import CHART, Render
from tests.charts.manifest_validation import crd_schemas, validate_manifest
from tests.charts.test_chart import by_kind, operator_deployment

MONITORED: dict[str, Any] = {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "unknown": ("",),
}


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One GPU, so the serving side's NVML collector yields its families on a machine without a GPU."""
    nvml = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=1, total=2),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=50),
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    yield


def registered_sample_names(fake_nvml: None) -> set[str]:
    """Every series name the worker's and the operator's registries can expose."""
    stats = EngineStats(0, 0, 0, 1, 0, 0, 0, 0, 0.0, 0, {"device": 0, "host": 0}, 0)
    worker = CollectorRegistry()
    ServingMetrics(types.SimpleNamespace(stats=stats), registry=worker)  # type: ignore[arg-type]
    TrainingMetrics(registry=worker)
    ControlDuties(registry=worker)
    GateMetrics(worker)
    names = set()
    for registry in (worker, JobMetrics().registry):
        for family in registry.collect():
            names |= {family.name + suffix for suffix in SAMPLE_SUFFIXES[family.type]}
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects; raises ValueError when it does not parse."""
    found: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            found.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def dashboard() -> dict[str, Any]:
    return json.loads((CHART / "dashboards" / "alchemist.json").read_text())


def dashboard_queries(board: dict[str, Any]) -> list[str]:
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    queries += [v["query"]["query"] for v in board["templating"]["list"] if isinstance(v.get("query"), dict)]
    return queries


def alert_rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    (rule,) = by_kind(docs)["PrometheusRule"]
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def test_every_metric_in_the_dashboard_and_alerts_is_registered(render: Render, fake_nvml: None) -> None:
    registered = registered_sample_names(fake_nvml)
    used: dict[str, set[str]] = {}
    for query in dashboard_queries(dashboard()):
        if query.startswith("label_values("):  # Grafana's function, not PromQL: its selector is
            query = query.removeprefix("label_values(").rsplit(",", 1)[0]
        for name in metric_names(query):
            used.setdefault(name, set()).add("dashboard")
    for rule in alert_rules(render(MONITORED)):
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(rule["alert"])
    unknown = {name: where for name, where in used.items() if name not in registered}
    assert not unknown, f"queries name metrics nobody registers: {unknown}"
    # What the issue asks the dashboard and alerts to cover, by the series that carry it.
    for needed in (
        "alchemist_time_to_first_token_seconds_bucket",
        "alchemist_generation_tokens_per_second",
        "alchemist_recorded_bytes",
        "alchemist_training_samples_total",
        "alchemist_training_tokens_per_second",
        "alchemist_training_loss",
        "alchemist_feedback_lag_seconds",
        "alchemist_weight_version",
        "alchemist_job_rollout_phase",
        "alchemist_job_rollout_events_total",
        "alchemist_job_replicas_not_following",
        "alchemist_feedback_dead_letters_total",
    ):
        assert needed in used, f"{needed} is on no panel and in no alert"


def test_the_name_check_catches_a_misspelt_metric(fake_nvml: None) -> None:
    assert "alchemist_training_los" not in registered_sample_names(fake_nvml)
    assert metric_names('max(alchemist_training_los{x="1"}) > 2') == {"alchemist_training_los"}
    with pytest.raises(ValueError):
        metric_names("sum(rate(alchemist_requests_total[5m])")


def test_alerts_cover_lag_dead_letters_rollbacks_and_replicas(render: Render) -> None:
    rules = {r["alert"]: r for r in alert_rules(render(MONITORED))}
    assert {
        "AlchemistFeedbackLagHigh",
        "AlchemistDeadLettersRising",
        "AlchemistCanaryRolledBack",
        "AlchemistReplicaNotFollowing",
    } <= set(rules)
    assert rules["AlchemistFeedbackLagHigh"]["expr"].endswith("> 900")
    tuned = alert_rules(
        render({**MONITORED, "prometheusRule": {"enabled": True, "feedbackLagSeconds": 60, "for": "2m"}})
    )
    lag = next(r for r in tuned if r["alert"] == "AlchemistFeedbackLagHigh")
    assert lag["expr"].endswith("> 60") and lag["for"] == "2m"
    for rule in rules.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert "{{ $labels.job_name }}" in rule["annotations"]["summary"]


def test_rendered_monitoring_manifests_validate(render: Render, crd_docs: list[dict[str, Any]]) -> None:
    docs = render(MONITORED)
    kinds = by_kind(docs)
    assert {"PrometheusRule", "PodMonitor", "ServiceMonitor"} <= set(kinds)
    for doc in docs:
        validate_manifest(doc, crd_schemas(crd_docs))
    (pod_monitor,) = kinds["PodMonitor"]
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["honorLabels"] is True
    (service_monitor,) = kinds["ServiceMonitor"]
    (relabel,) = service_monitor["spec"]["endpoints"][0]["relabelings"]
    assert relabel["targetLabel"] == "job_name"


def test_defaults_ship_the_dashboard_and_no_prometheus_operator_objects(render: Render) -> None:
    docs = render()
    kinds = by_kind(docs)
    assert not {"PrometheusRule", "PodMonitor", "ServiceMonitor"} & set(kinds)
    (board,) = [c for c in kinds["ConfigMap"] if c["metadata"]["name"] == "alc-alchemist-dashboard"]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(board["data"]["alchemist.json"]) == dashboard()
    (container,) = operator_deployment(docs)["spec"]["template"]["spec"]["containers"]
    assert "--metrics-port=8081" in container["args"]
    assert {"name": "metrics", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    policy = next(p for p in kinds["NetworkPolicy"] if p["metadata"]["name"] == "alc-alchemist-operator")
    assert {"port": 8081, "protocol": "TCP"} in policy["spec"]["ingress"][0]["ports"]
    off = by_kind(render({"dashboard": {"enabled": False}, "metricsPort": 0}))
    assert all(c["metadata"]["name"] != "alc-alchemist-dashboard" for c in off.get("ConfigMap", []))
    (container,) = operator_deployment(render({"metricsPort": 0, "logFormat": "json"}))["spec"]["template"][
        "spec"
    ]["containers"]
    assert "--metrics-port=0" in container["args"] and all(p["name"] != "metrics" for p in container["ports"])
    assert "--log-format=json" in container["args"]


def test_dashboard_panels_are_laid_out_and_use_the_datasource_variable() -> None:
    board = dashboard()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"]
