"""`alchemist`: a person's view of a ContinualLearningJob, and the one command that changes it (rollback).

It reads the job from the Kubernetes API with your kubeconfig and its state from the job's Redis. Redis is found
at `--redis-url`, else `ALCHEMIST_REDIS_URL`, else the job's `spec.feedback.redisUrl`, else redis://127.0.0.1:6379/0
(a `kubectl port-forward` to the chart's Redis); its password comes from `ALCHEMIST_REDIS_PASSWORD`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

import redis
from alchemist_protocol.rollback_command import roll_back_and_settle
from rich.console import Console

from alchemist_cli.feedback_tail import follow, newest, row_line, tail_table
from alchemist_cli.kube_view import KubeView, read_kube_view
from alchemist_cli.redis_view import RedisView, open_store, read_view
from alchemist_cli.status_report import status_report

LOCAL_REDIS = "redis://127.0.0.1:6379/0"


def redis_url_for(flag: str | None, environ: Mapping[str, str], spec: Mapping[str, object]) -> str:
    feedback = spec.get("feedback")
    from_spec = feedback.get("redisUrl") if isinstance(feedback, Mapping) else None
    return flag or environ.get("ALCHEMIST_REDIS_URL") or (str(from_spec) if from_spec else "") or LOCAL_REDIS


def stream_for(spec: Mapping[str, object]) -> str | None:
    feedback = spec.get("feedback")
    stream = feedback.get("stream") if isinstance(feedback, Mapping) else None
    return str(stream) if stream else None


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("job", help="the ContinualLearningJob's name")
    common.add_argument(
        "-n", "--namespace", default=environ.get("ALCHEMIST_NAMESPACE", "default"), help="the job's namespace"
    )
    common.add_argument("--redis-url", default=None, help="the job's Redis [ALCHEMIST_REDIS_URL]")
    common.add_argument(
        "--no-kubernetes", action="store_true", help="read Redis only (no cluster access from here)"
    )
    parser = argparse.ArgumentParser(prog="alchemist", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser(
        "status",
        parents=[common],
        help="versions and lineage, rollout and gate readings, feedback lag, dead letters, replicas",
    )
    status.add_argument("--versions", type=int, default=10, help="how many of the newest versions to list")
    rollback = commands.add_parser(
        "rollback",
        parents=[common],
        help="serve VERSION on every replica again, and train on from it (newer versions are not served again)",
    )
    rollback.add_argument("version", type=int)
    rollback.add_argument("--reason", default="", help="kept with the rollback request")
    rollback.add_argument(
        "--settle",
        type=float,
        default=2.0,
        help="seconds after which to check that no rollout decision racing with the rollback replaced it",
    )
    feedback = commands.add_parser("feedback", help="the job's feedback stream")
    feedback_commands = feedback.add_subparsers(dest="feedback_command", required=True)
    tail = feedback_commands.add_parser("tail", parents=[common], help="the newest feedback entries")
    tail.add_argument("-c", "--count", type=int, default=20, help="how many of the newest entries to show")
    tail.add_argument("-f", "--follow", action="store_true", help="then show new entries as they arrive")
    tail.add_argument("--dead", action="store_true", help="the dead-letter stream instead, with reasons")
    return parser


def _kube(args: argparse.Namespace) -> KubeView:
    if args.no_kubernetes:
        return KubeView(error="not read (--no-kubernetes)")
    return read_kube_view(args.namespace, args.job)


def _status(args: argparse.Namespace, environ: Mapping[str, str], console: Console) -> int:
    kube = _kube(args)
    url = redis_url_for(args.redis_url, environ, kube.spec)
    view: RedisView | None = None
    redis_error = ""
    try:
        store = open_store(
            url, args.namespace, args.job, stream_for(kube.spec), environ.get("ALCHEMIST_REDIS_PASSWORD")
        )
        try:
            view = read_view(store, versions=args.versions)
        finally:
            store.close()
    except (redis.RedisError, OSError, ValueError) as exc:
        redis_error = f"{url}: {exc}"
    console.print(status_report(args.namespace, args.job, kube, view, redis_error))
    return 0 if view is not None or kube.job is not None else 1


def _rollback(args: argparse.Namespace, environ: Mapping[str, str], console: Console) -> int:
    kube = _kube(args) if args.redis_url is None and "ALCHEMIST_REDIS_URL" not in environ else KubeView()
    url = redis_url_for(args.redis_url, environ, kube.spec)
    store = open_store(url, args.namespace, args.job, None, environ.get("ALCHEMIST_REDIS_PASSWORD"))
    try:
        outcome, redone = roll_back_and_settle(
            store.client, store.keys, args.version, args.reason, settle_s=args.settle
        )
    finally:
        store.close()
    console.print(f"rollback to version {args.version} requested: the trainer continues from it")
    if redone:
        console.print(f"a rollout decision taken at the same moment replaced it; written again ({redone}x)")
    if outcome.pointer is None:
        console.print(
            "no operator manages this job's rollout: replicas following the newest version return to it"
        )
    else:
        rejected = ", ".join(map(str, outcome.rejected)) or "none"
        console.print(f"every replica is asked to serve version {args.version}; not served again: {rejected}")
    return 0


def _tail(args: argparse.Namespace, environ: Mapping[str, str], console: Console) -> int:
    kube = _kube(args) if not args.no_kubernetes else KubeView()
    url = redis_url_for(args.redis_url, environ, kube.spec)
    store = open_store(
        url, args.namespace, args.job, stream_for(kube.spec), environ.get("ALCHEMIST_REDIS_PASSWORD")
    )
    stream = store.keys.dead_letters if args.dead else store.keys.feedback
    try:
        rows = newest(store.stream_client, stream, args.count, args.dead)
        console.print(tail_table(rows, f"{stream} ({len(rows)} newest)"))
        if args.follow:
            after = rows[-1].entry_id if rows else "$"
            for row in follow(store.stream_client, stream, after, args.dead):
                console.print(row_line(row))
    except KeyboardInterrupt:
        pass
    finally:
        store.close()
    return 0


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    args = build_parser(environ).parse_args(sys.argv[1:] if argv is None else list(argv))
    console = Console()
    errors = Console(stderr=True)
    command = {"status": _status, "rollback": _rollback, "feedback": _tail}[args.command]
    try:
        return command(args, environ, console)
    except ValueError as exc:  # a version never published, a malformed URL
        errors.print(f"alchemist {args.command}: {exc}", markup=False)
        return 2
    except (redis.RedisError, OSError) as exc:
        errors.print(f"alchemist {args.command}: Redis: {exc}", markup=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
