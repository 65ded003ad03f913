"""`alchemist-worker`: the worker's command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from alchemist_worker.bundled_model import ensure_small_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alchemist-worker")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch-model", help="obtain SmolLM2-135M-Instruct as a plain HF checkpoint")
    fetch.add_argument("--cache-dir", type=Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "fetch-model":
        print(ensure_small_model(args.cache_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
