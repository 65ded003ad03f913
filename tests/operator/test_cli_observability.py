"""The operator's command line: JSON logs and the metrics port, as the chart sets them."""

from __future__ import annotations

import httpx
import pytest
from alchemist_operator.cli import build_parser
from alchemist_operator.job_metrics import JobMetrics
from alchemist_protocol.local_redis import free_port
from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families


def test_log_format_and_metrics_port_from_flags_and_environment() -> None:
    args = build_parser({}).parse_args([])
    assert (args.log_format, args.metrics_port) == ("text", 0)
    env = {"ALCHEMIST_LOG_FORMAT": "json", "ALCHEMIST_OPERATOR_METRICS_PORT": "9100"}
    args = build_parser(env).parse_args([])
    assert (args.log_format, args.metrics_port) == ("json", 9100)
    assert build_parser(env).parse_args(["--metrics-port=8081", "--log-format=text"]).metrics_port == 8081
    with pytest.raises(ValueError, match="ALCHEMIST_LOG_FORMAT"):
        build_parser({"ALCHEMIST_LOG_FORMAT": "xml"})


def test_job_metrics_are_scraped_over_http() -> None:
    metrics = JobMetrics()
    status = {
        "readyReplicas": 2,
        "targetVersion": 4,
        "rollout": {"phase": "Canary", "stableVersion": 3, "canaryVersion": 4, "canaryReplicas": ["a-1"]},
        "replicaVersions": {"a-0": 3, "a-1": 3},
        "feedbackLag": 17,
    }
    metrics.observe_status("ns", "a", status)
    metrics.count_event("ns", "a", "CanaryStarted")
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        server.shutdown()
        thread.join(5)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    job = (("job_name", "a"), ("namespace", "ns"))
    assert samples[("alchemist_job_canary_version", job)] == 4
    assert samples[("alchemist_job_replicas_not_following", job)] == 1  # a-1 should serve 4
    assert samples[("alchemist_job_feedback_lag_entries", job)] == 17
    assert samples[("alchemist_job_rollout_phase", (*job, ("phase", "Canary")))] == 1
    assert samples[("alchemist_job_rollout_events_total", (*job, ("reason", "CanaryStarted")))] == 1


def test_main_wires_json_logs_and_the_metrics_server(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging
    from collections.abc import Coroutine
    from typing import Any

    from alchemist_operator import cli
    from alchemist_protocol.log_format import JsonFormatter

    served: list[tuple[int, Any]] = []
    ran: list[Any] = []

    def fake_run(coroutine: Coroutine[Any, Any, None]) -> None:
        ran.append(coroutine.cr_frame.f_locals["metrics"])  # the JobMetrics the operator would fill
        coroutine.close()

    monkeypatch.setattr(cli.asyncio, "run", fake_run)
    monkeypatch.setattr(cli, "start_http_server", lambda port, registry: served.append((port, registry)))
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        cli.main(["--log-format=json", "--metrics-port=9187", "--standalone", "--namespace=a"])
        assert any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    finally:
        root.handlers = saved
        root.setLevel(level)
    assert isinstance(ran[0], JobMetrics) and served == [(9187, ran[0].registry)]
