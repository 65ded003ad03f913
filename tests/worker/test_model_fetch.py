"""The model-fetch init container's program against a real S3-compatible server (moto's, started by the tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alchemist_worker.model_fetch import INCOMING, MARKER, FetchError, fetch
from alchemist_worker.object_store import S3Location, list_objects


def _checkpoint() -> dict[str, bytes]:
    return {
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 64}).encode(),
        "model.safetensors": os.urandom(3 * 2**20 + 17),  # several chunks of the ranged reads
        "tokenizer/tokenizer.json": b'{"version": "1.0"}',
        "empty.txt": b"",
    }


def _upload(client: Any, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != MARKER
    }


def _run(uri: str, dest: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alchemist_worker.model_fetch", uri, str(dest), "--progress-seconds", "0"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_init_container_program_copies_the_checkpoint_and_logs_progress(
    s3_bucket: tuple[Any, str], s3_env: dict[str, str], tmp_path: Path
) -> None:
    client, bucket = s3_bucket
    files = _checkpoint()
    _upload(client, bucket, "models/tiny", files)
    dest = tmp_path / "models"
    done = _run(f"s3://{bucket}/models/tiny", dest, s3_env)
    assert done.returncode == 0, done.stderr
    assert _tree(dest) == files
    assert not (dest / INCOMING).exists()
    lines = done.stdout.splitlines()
    assert lines[0].startswith("model-fetch: fetching 4 files")
    assert any("(100%), 4/4 files" in line for line in lines)
    assert lines[-1].startswith("model-fetch: done")
    assert "alchemist-test-secret" not in done.stdout + done.stderr

    again = _run(f"s3://{bucket}/models/tiny", dest, s3_env)
    assert again.returncode == 0 and "nothing to fetch" in again.stdout


def test_an_interrupted_fetch_continues_where_it_stopped(s3_bucket: tuple[Any, str], tmp_path: Path) -> None:
    client, bucket = s3_bucket
    files = _checkpoint()
    _upload(client, bucket, "m", files)
    dest = tmp_path / "models"
    incoming = dest / INCOMING
    # What a killed container leaves: one complete file, and half of the weights in their part file. The part is
    # marked (its first bytes flipped) so the test can tell a continued download from a fresh one.
    (incoming / "tokenizer").mkdir(parents=True)
    (incoming / "config.json").write_bytes(files["config.json"])
    half = len(files["model.safetensors"]) // 2
    marked = bytes(b ^ 0xFF for b in files["model.safetensors"][:half])
    (incoming / "model.safetensors.part").write_bytes(marked)
    lines: list[str] = []
    assert fetch(f"s3://{bucket}/m", dest, client, say=lines.append, every_s=0)
    assert (dest / "model.safetensors").read_bytes() == marked + files["model.safetensors"][half:]
    assert (dest / "config.json").read_bytes() == files["config.json"]
    assert not list(dest.rglob("*.part"))


def test_a_source_changed_since_the_last_fetch_replaces_the_old_files(
    s3_bucket: tuple[Any, str], tmp_path: Path
) -> None:
    client, bucket = s3_bucket
    _upload(client, bucket, "a", {"config.json": b"{}", "old.bin": b"old"})
    _upload(client, bucket, "b", {"config.json": b'{"b": 1}', "new.bin": b"new"})
    dest = tmp_path / "models"
    assert fetch(f"s3://{bucket}/a", dest, client, say=lambda line: None)
    assert fetch(f"s3://{bucket}/b", dest, client, say=lambda line: None)
    assert _tree(dest) == {"config.json": b'{"b": 1}', "new.bin": b"new"}


def test_missing_sources_fail_with_what_to_fix(
    s3_bucket: tuple[Any, str], s3_env: dict[str, str], tmp_path: Path
) -> None:
    client, bucket = s3_bucket
    with pytest.raises(FetchError, match="no objects under"):
        fetch(f"s3://{bucket}/nothing-here", tmp_path / "m", client, say=lambda line: None)
    missing_bucket = _run("s3://no-such-bucket/m", tmp_path / "m", s3_env)
    assert missing_bucket.returncode == 1
    assert "model-fetch failed reading s3://no-such-bucket/m" in missing_bucket.stderr
    assert "NoSuchBucket" in missing_bucket.stderr
    bad_key = _run(f"s3://{bucket}/m", tmp_path / "m", {**s3_env, "AWS_ACCESS_KEY_ID": ""})
    assert bad_key.returncode == 1 and "model-fetch failed" in bad_key.stderr


def test_listing_skips_folder_markers_and_keeps_paths_relative(s3_bucket: tuple[Any, str]) -> None:
    client, bucket = s3_bucket
    _upload(client, bucket, "p", {"dir/": b"", "dir/x": b"1", "y": b"22"})
    found = list_objects(client, S3Location.parse(f"s3://{bucket}/p/"))
    assert [(o.relative, o.size) for o in found] == [("dir/x", 1), ("y", 2)]
