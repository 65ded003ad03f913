"""The operator's command line and kopf settings: flags, environment fallbacks, peering for HA."""

from __future__ import annotations

import logging

import kopf
import pytest
from alchemist_operator.cli import config_from_args
from alchemist_operator.kopf_settings import build_settings
from alchemist_operator.operator_config import OperatorConfig


def test_flags_win_over_environment() -> None:
    env = {"ALCHEMIST_WORKER_IMAGE": "env/worker:1", "ALCHEMIST_DEFAULT_REDIS_URL": "redis://env:6379/0"}
    config, verbose = config_from_args(
        [
            "--namespace",
            "a",
            "--namespace",
            "b",
            "--worker-image",
            "flag/worker:2",
            "--priority",
            "7",
            "--verbose",
        ],
        env,
    )
    assert config.namespaces == ("a", "b") and not config.clusterwide
    assert config.worker_image == "flag/worker:2"
    assert config.default_redis_url == "redis://env:6379/0"
    assert config.priority == 7 and verbose


def test_environment_alone_configures_the_operator() -> None:
    env = {
        "ALCHEMIST_OPERATOR_NAMESPACES": "team-a, team-b",
        "ALCHEMIST_OPERATOR_MONITOR_INTERVAL": "2.5",
        "ALCHEMIST_OPERATOR_STANDALONE": "true",
    }
    config, verbose = config_from_args([], env)
    assert config.namespaces == ("team-a", "team-b")
    assert config.monitor_interval_seconds == 2.5 and config.standalone and not verbose
    assert config.default_redis_url is None and config.default_redis_password is None
    assert config.drift_check_seconds == 30.0


def test_the_redis_password_comes_from_the_environment_and_is_never_printed() -> None:
    env = {
        "ALCHEMIST_DEFAULT_REDIS_PASSWORD": "pw-from-secret",
        "ALCHEMIST_OPERATOR_DRIFT_CHECK_INTERVAL": "5",
    }
    config, _ = config_from_args([], env)
    assert config.default_redis_password == "pw-from-secret" and config.drift_check_seconds == 5.0
    assert "pw-from-secret" not in repr(config)


def test_replicas_draw_distinct_priorities_so_exactly_one_works() -> None:
    """kopf pauses every operator that sees a peer of the same priority: replicas must never tie."""
    priorities = {config_from_args([], {})[0].priority for _ in range(20)}
    assert len(priorities) == 20 and all(p > 0 for p in priorities)
    assert config_from_args([], {})[0].clusterwide


def test_kopf_settings() -> None:
    settings = build_settings(OperatorConfig(peering_name="prod", priority=42))
    assert settings.peering.name == "prod" and settings.peering.priority == 42
    assert settings.peering.mandatory and not settings.peering.standalone and settings.peering.clusterwide
    assert settings.scanning.disabled  # no cluster-wide CRD or namespace watching needed
    assert settings.posting.level == logging.WARNING
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert settings.persistence.finalizer == "alchemist.dev/finalizer"
    standalone = build_settings(OperatorConfig(standalone=True, namespaces=("a",)))
    assert (
        standalone.peering.standalone
        and not standalone.peering.mandatory
        and not standalone.peering.clusterwide
    )


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="monitor interval"):
        OperatorConfig(monitor_interval_seconds=0)
    with pytest.raises(SystemExit):
        config_from_args(["--monitor-interval", "soon"], {})
