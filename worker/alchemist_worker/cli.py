"""`alchemist-worker`: the worker's command line."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from alchemist_worker.bundled_model import ensure_small_model


def build_parser() -> argparse.ArgumentParser:
    from alchemist_worker.api.serve_settings import add_serve_arguments

    parser = argparse.ArgumentParser(prog="alchemist-worker")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch-model", help="obtain SmolLM2-135M-Instruct as a plain HF checkpoint")
    fetch.add_argument("--cache-dir", type=Path, default=None)
    serve = commands.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API, recording prefills for training",
        description="Each flag can also be set by the ALCHEMIST_* environment variable named in its help; "
        "a flag wins over the variable.",
    )
    add_serve_arguments(serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "fetch-model":
        print(ensure_small_model(args.cache_dir))
    elif args.command == "serve":
        from alchemist_worker.api.serve import serve
        from alchemist_worker.api.serve_settings import resolve_settings

        try:
            return serve(resolve_settings(args))
        except (
            ValueError
        ) as exc:  # bad settings, an unusable checkpoint, a missing engine, a KV budget too small
            write_termination_message(f"alchemist-worker: {exc}")
            parser.error(str(exc))
    return 0


def write_termination_message(message: str) -> None:
    """Kubernetes shows this file's text as the container's last termination message (the operator reads it,
    so a pod that cannot start says why in the job's status instead of crash-looping silently)."""
    path = Path(os.environ.get("ALCHEMIST_TERMINATION_LOG", "/dev/termination-log"))
    try:
        if path.is_file():  # Kubernetes mounts it; elsewhere nothing is written
            path.write_text(message[:4000])
    except OSError:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
