"""Copies a checkpoint from an S3-compatible store into the pod: `python -m alchemist_worker.model_fetch URI DEST`.

Run by the worker pod's `model-fetch` init container (the operator builds it for `spec.model.uri: s3://...`).
Progress goes to stdout, one line every few seconds, so `kubectl logs <pod> -c model-fetch` shows how far it got;
a failure ends with one line saying what to fix, which Kubernetes keeps as the termination message and the
operator reports on the job.

Restartable at any point: files are downloaded under `DEST/.incoming/` (each through a `.part` file, continued
where it stopped), moved into DEST only once all are complete, and a marker written last records what DEST holds,
so a restarted container neither re-downloads what it has nor lets the worker see half a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alchemist_worker.object_store import RemoteObject, S3Location, download, list_objects, s3_client

MARKER = ".alchemist-model.json"
INCOMING = ".incoming"


class FetchError(RuntimeError):
    """The model cannot be fetched as configured; the message says what to fix."""


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


class Progress:
    def __init__(self, total: int, files: int, say: Callable[[str], None], every_s: float) -> None:
        self.total, self.files, self.say, self.every_s = total, files, say, every_s
        self.done = 0
        self.files_done = 0
        self.started = time.monotonic()
        self.last = 0.0

    def add(self, n: int) -> None:
        self.done += n
        if time.monotonic() - self.last >= self.every_s:
            self.report()

    def report(self) -> None:
        self.last = time.monotonic()
        elapsed = max(self.last - self.started, 1e-6)
        percent = 100.0 * self.done / self.total if self.total else 100.0
        self.say(
            f"fetched {_size(self.done)} of {_size(self.total)} ({percent:.0f}%), "
            f"{self.files_done}/{self.files} files, {_size(self.done / elapsed)}/s"
        )


def _inside(root: Path, relative: str) -> Path:
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()):
        raise FetchError(f"object {relative!r} would be written outside {root}")
    return target


def _wanted(uri: str, objects: list[RemoteObject]) -> dict[str, Any]:
    return {"uri": uri, "objects": [[o.relative, o.size, o.etag] for o in objects]}


def fetch(
    uri: str,
    dest: Path,
    client: Any | None = None,
    say: Callable[[str], None] = lambda line: print(f"model-fetch: {line}", flush=True),
    every_s: float = 5.0,
) -> bool:
    """Makes DEST hold the objects under `uri`; False when it already did (nothing downloaded)."""
    location = S3Location.parse(uri)
    client = client or s3_client()
    objects = list_objects(client, location)
    if not objects:
        raise FetchError(f"no objects under {uri}: check the bucket and prefix in spec.model.uri")
    dest.mkdir(parents=True, exist_ok=True)
    marker = dest / MARKER
    wanted = _wanted(uri, objects)
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        say(f"{dest} already holds {uri} ({len(objects)} files); nothing to fetch")
        return False
    marker.unlink(missing_ok=True)
    incoming = dest / INCOMING
    progress = Progress(sum(o.size for o in objects), len(objects), say, every_s)
    say(f"fetching {len(objects)} files, {_size(progress.total)}, from {uri} into {dest}")
    for remote in objects:
        target = _inside(incoming, remote.relative)
        if target.is_file() and target.stat().st_size == remote.size:
            progress.add(remote.size)  # completed by an earlier run
        else:
            download(client, location, remote, target, progress.add)
        progress.files_done += 1
    progress.report()
    for old in dest.iterdir():  # what an earlier fetch of another source left
        if old.name not in (INCOMING, MARKER):
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    for entry in incoming.iterdir():
        os.replace(entry, dest / entry.name)
    incoming.rmdir()
    partial = marker.with_name(MARKER + ".tmp")
    partial.write_text(json.dumps(wanted))
    os.replace(partial, marker)
    say(f"done: {uri} is in {dest}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alchemist_worker.model_fetch", description=__doc__)
    parser.add_argument("uri", help="s3://bucket/prefix of the checkpoint")
    parser.add_argument("dest", type=Path, help="directory to fill (the pod's model volume)")
    parser.add_argument("--progress-seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    try:
        fetch(args.uri, args.dest, every_s=args.progress_seconds)
    except (FetchError, ValueError) as exc:
        print(f"model-fetch failed: {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # botocore's errors: report the store's words and what to check
        name = type(exc).__name__
        hint = ""
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            hint = "; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in spec.model.s3.credentialsSecret"
        elif name in ("EndpointConnectionError", "ConnectTimeoutError"):
            hint = "; check spec.model.s3.endpoint"
        print(f"model-fetch failed reading {args.uri}: {name}: {exc}{hint}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
