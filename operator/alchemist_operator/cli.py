"""`alchemist-operator`: runs the kopf operator that reconciles ContinualLearningJobs.

Every option also reads an environment variable, so the Helm chart can pass secrets (the default Redis URL) from
a Secret. Run several replicas for high availability: they peer through a KopfPeering object, the one with the
highest priority works and the others stand by; by default each replica draws a random priority.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
from collections.abc import Mapping, Sequence

import kopf
from alchemist_protocol.log_format import LOG_FORMATS, configure_logging, log_format_from_env
from prometheus_client import start_http_server

from alchemist_operator.cluster_api import ClusterApi
from alchemist_operator.handlers import registry
from alchemist_operator.job_memo import JobMemo
from alchemist_operator.job_metrics import JobMetrics
from alchemist_operator.kopf_settings import build_settings
from alchemist_operator.operator_config import OperatorConfig


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    env = environ.get
    parser = argparse.ArgumentParser(prog="alchemist-operator", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--namespace",
        action="append",
        default=None,
        help="watch this namespace (repeatable); default: every namespace [ALCHEMIST_OPERATOR_NAMESPACES, comma-separated]",
    )
    parser.add_argument("--worker-image", default=env("ALCHEMIST_WORKER_IMAGE", OperatorConfig.worker_image))
    parser.add_argument(
        "--redis-url",
        default=env("ALCHEMIST_DEFAULT_REDIS_URL"),
        help="Redis for jobs that name none [ALCHEMIST_DEFAULT_REDIS_URL]",
    )
    parser.add_argument(
        "--redis-password",
        default=env("ALCHEMIST_DEFAULT_REDIS_PASSWORD"),
        help="password of that Redis; prefer the environment variable [ALCHEMIST_DEFAULT_REDIS_PASSWORD]",
    )
    parser.add_argument(
        "--drift-check-interval",
        type=float,
        default=float(env("ALCHEMIST_OPERATOR_DRIFT_CHECK_INTERVAL", OperatorConfig.drift_check_seconds)),
        help="seconds between two checks that every child of a job matches its spec (drift is repaired)",
    )
    parser.add_argument(
        "--monitor-interval",
        type=float,
        default=float(env("ALCHEMIST_OPERATOR_MONITOR_INTERVAL", OperatorConfig.monitor_interval_seconds)),
        help="seconds between two status and rollout checks of a job",
    )
    parser.add_argument("--peering", default=env("ALCHEMIST_OPERATOR_PEERING", OperatorConfig.peering_name))
    parser.add_argument(
        "--standalone",
        action="store_true",
        default=env("ALCHEMIST_OPERATOR_STANDALONE", "") == "true",
        help="run without peering (a single replica; no KopfPeering object needed)",
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=int(env("ALCHEMIST_OPERATOR_PRIORITY", "0")) or None,
        help="peering priority; default: random, so replicas never tie (a tie pauses them all)",
    )
    parser.add_argument(
        "--liveness",
        default=env("ALCHEMIST_OPERATOR_LIVENESS", OperatorConfig.liveness_endpoint),
        help="URL of the liveness endpoint; empty disables it",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(env("ALCHEMIST_OPERATOR_METRICS_PORT", "0")),
        help="serve the jobs' Prometheus metrics on this port (0: not served) [ALCHEMIST_OPERATOR_METRICS_PORT]",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=log_format_from_env(environ),
        help="log lines as text or one JSON object per line [ALCHEMIST_LOG_FORMAT]",
    )
    parser.add_argument("--verbose", action="store_true")
    return parser


def config_from_args(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[OperatorConfig, bool]:
    """The operator's configuration and whether to log verbosely."""
    args = build_parser(environ).parse_args(list(argv))
    namespaces = args.namespace
    if namespaces is None:
        namespaces = [n for n in environ.get("ALCHEMIST_OPERATOR_NAMESPACES", "").split(",") if n.strip()]
    config = OperatorConfig(
        worker_image=args.worker_image,
        default_redis_url=args.redis_url or None,
        default_redis_password=args.redis_password or None,
        drift_check_seconds=args.drift_check_interval,
        monitor_interval_seconds=args.monitor_interval,
        namespaces=tuple(n.strip() for n in namespaces),
        peering_name=args.peering,
        standalone=args.standalone,
        priority=args.priority if args.priority is not None else random.SystemRandom().randint(1, 2**31 - 1),
        liveness_endpoint=args.liveness or None,
    )
    return config, bool(args.verbose)


async def run(
    config: OperatorConfig,
    stop_flag: asyncio.Event | None = None,
    peer_id: str | None = None,
    metrics: JobMetrics | None = None,
) -> None:
    """Runs until `stop_flag` is set. `peer_id` names this replica among its peers (default: kopf's, from the
    host and process); operators sharing one process need distinct ones."""
    cluster = ClusterApi.from_environment()
    try:
        await kopf.operator(
            registry=registry,
            settings=build_settings(config),
            memo=JobMemo(config=config, cluster=cluster, metrics=metrics or JobMetrics()),
            clusterwide=config.clusterwide,
            namespaces=config.namespaces,
            standalone=config.standalone,
            liveness_endpoint=config.liveness_endpoint,
            stop_flag=stop_flag,
            identity=peer_id,  # type: ignore[arg-type]  # kopf types it as a NewType of str
        )
    finally:
        cluster.close()


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config, verbose = config_from_args(argv, os.environ)
    process = build_parser(os.environ).parse_args(list(argv))  # what is not the operator's config
    kopf.configure(verbose=verbose, log_format=kopf.LogFormat.FULL)
    if process.log_format == "json":
        configure_logging("json", logging.DEBUG if verbose else logging.INFO)
    metrics = JobMetrics()
    if process.metrics_port:
        start_http_server(process.metrics_port, registry=metrics.registry)
    asyncio.run(run(config, metrics=metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
