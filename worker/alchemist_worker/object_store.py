"""An S3-compatible bucket as the model fetcher and the versions store use it: listing, resumable downloads.

boto3 takes the endpoint, region and credentials from its own variables (`AWS_ENDPOINT_URL_S3`, `AWS_REGION`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`), which the operator sets from the job's spec and Secret; nothing
here reads or logs a credential. Imports no torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHUNK = 8 * 2**20


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # no leading or trailing slash; "" for the whole bucket

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        if not uri.startswith("s3://"):
            raise ValueError(f"{uri!r} is not an s3:// URI")
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"{uri!r} names no bucket (s3://bucket/prefix)")
        return cls(bucket, prefix.strip("/"))

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def child(self, relative: str) -> S3Location:
        return S3Location(self.bucket, self.key(relative.strip("/")))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class RemoteObject:
    relative: str  # path under the location's prefix
    size: int
    etag: str


def s3_client() -> Any:
    """A client configured from the environment; boto3 is imported here, so only S3 users need it."""
    import boto3
    from botocore.config import Config

    retries = {"max_attempts": 8, "mode": "standard"}
    return boto3.client("s3", config=Config(retries=retries))


def list_objects(client: Any, location: S3Location) -> list[RemoteObject]:
    """Every object under the prefix (folder markers skipped), sorted by path."""
    found = []
    prefix = f"{location.prefix}/" if location.prefix else ""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            relative = item["Key"][len(prefix) :]
            if relative and not relative.endswith("/"):
                found.append(RemoteObject(relative, int(item["Size"]), str(item.get("ETag", ""))))
    return sorted(found, key=lambda o: o.relative)


def _chunks(body: Any) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(CHUNK)
    finally:
        body.close()


def download(
    client: Any,
    location: S3Location,
    remote: RemoteObject,
    dest: Path,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> None:
    """`remote` into `dest`, through `dest.part`: a part left by an interrupted run is continued from where it
    stopped (a ranged GET pinned to the same ETag), and `dest` appears only once complete and synced."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if have > remote.size:
        part.unlink()
        have = 0
    if have:
        on_bytes(have)
    if have < remote.size:
        request: dict[str, Any] = {"Bucket": location.bucket, "Key": location.key(remote.relative)}
        if have:
            request["Range"] = f"bytes={have}-"
        if remote.etag:
            request["IfMatch"] = (
                remote.etag
            )  # the object changed since listing: fail, never splice two versions
        body = client.get_object(**request)["Body"]
        with part.open("ab") as out:
            for chunk in _chunks(body):
                out.write(chunk)
                on_bytes(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    elif remote.size == 0:
        part.touch()
    got = part.stat().st_size
    if got != remote.size:
        raise OSError(f"{location.key(remote.relative)}: got {got} bytes, expected {remote.size}")
    os.replace(part, dest)


def upload_file(client: Any, location: S3Location, relative: str, source: Path) -> None:
    client.upload_file(str(source), location.bucket, location.key(relative))


def put_bytes(client: Any, location: S3Location, relative: str, data: bytes) -> None:
    client.put_object(Bucket=location.bucket, Key=location.key(relative), Body=data)


def get_bytes(client: Any, location: S3Location, relative: str) -> bytes | None:
    """The object's content, or None when it does not exist."""
    try:
        response = client.get_object(Bucket=location.bucket, Key=location.key(relative))
    except client.exceptions.NoSuchKey:
        return None
    return bytes(response["Body"].read())


def delete_prefix(client: Any, location: S3Location) -> int:
    """Deletes every object under the location's prefix; returns how many."""
    keys = [{"Key": location.key(o.relative)} for o in list_objects(client, location)]
    for start in range(0, len(keys), 1000):
        client.delete_objects(Bucket=location.bucket, Delete={"Objects": keys[start : start + 1000]})
    return len(keys)
