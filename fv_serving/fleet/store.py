"""Where a fleet's model repository lives: a local folder or an S3 prefix, behind one small interface.

Keys are paths relative to the repository root ("forget_step/config.pbtxt"). What
the fleet code needs, and how each store gives it:

  read / write      a whole object; a write is atomic for readers (local: temp file,
                    fsync, rename; S3: one PUT replaces the object in one step)
  keys / delete     the keys under a prefix
  journal           append one entry durably (local: the repository's journal.jsonl,
                    fv_serving.triton.journal; S3: one object per entry, since S3 has
                    no append)
  triton_url        what tritonserver's --model-repository takes

S3 has no rename and no empty folders: a version "folder" is its objects, and a
folder Triton needs to exist empty (an ensemble's `1/`) is a zero-byte key ending in
"/". Endpoint, region and credentials come from the standard AWS settings (the
environment, AWS_ENDPOINT_URL for an S3-compatible store, or a profile): the store
passes nothing of its own to boto3, so whatever works for the AWS CLI works here.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from fv_serving.atomic import write_bytes_atomic
from fv_serving.errors import DataNotFoundError, InvalidInputError, ServerError
from fv_serving.triton import journal

#: Prefix of S3 journal objects (one per entry; the name sorts by time).
JOURNAL_PREFIX = ".fv-journal/"


class Store(Protocol):
    """A repository's objects (see the module docstring)."""

    @property
    def url(self) -> str: ...

    def read(self, key: str) -> bytes: ...
    def write(self, key: str, data: bytes) -> None: ...
    def exists(self, key: str) -> bool: ...
    def keys(self, prefix: str) -> list[str]: ...
    def delete(self, keys: Iterable[str]) -> None: ...
    def append_journal(self, event: str, **fields: Any) -> dict[str, Any]: ...
    def read_journal(self) -> list[dict[str, Any]]: ...
    @property
    def triton_url(self) -> str: ...


@dataclass(frozen=True)
class LocalStore:
    """A repository folder on this machine (or a shared file system)."""

    root: Path

    @property
    def url(self) -> str:
        return str(self.root)

    @property
    def triton_url(self) -> str:
        return str(self.root.absolute())

    def read(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError as exc:
            raise DataNotFoundError(f"{self.root / key} is missing") from exc

    def write(self, key: str, data: bytes) -> None:
        if key.endswith("/"):
            (self.root / key).mkdir(parents=True, exist_ok=True)
        else:
            write_bytes_atomic(self.root / key, data)

    def exists(self, key: str) -> bool:
        return (self.root / key).exists()

    def keys(self, prefix: str) -> list[str]:
        base = self.root / prefix
        if not base.exists():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file())

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            path = self.root / key
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def append_journal(self, event: str, **fields: Any) -> dict[str, Any]:
        return journal.append(self.root, event, **fields)

    def read_journal(self) -> list[dict[str, Any]]:
        return journal.read(self.root)


class S3Store:
    """A repository under s3://bucket/prefix, through boto3 (the standard AWS settings apply)."""

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise InvalidInputError(f"an S3 repository is s3://BUCKET/PREFIX, got {url!r}")
        self._url = url.rstrip("/")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        import boto3  # the [fleet] extra: only S3 repositories need it

        self._s3 = boto3.client("s3")
        self._endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    @property
    def url(self) -> str:
        return self._url

    @property
    def triton_url(self) -> str:
        """Triton's form: s3://host:port/bucket/prefix for an S3-compatible endpoint, else s3://bucket/prefix."""
        where = f"{self.bucket}/{self.prefix}".rstrip("/")
        if not self._endpoint:
            return f"s3://{where}"
        endpoint = urlparse(self._endpoint)
        return f"s3://{endpoint.hostname}:{endpoint.port or (443 if endpoint.scheme == 'https' else 80)}/{where}"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, call: Any) -> Any:
        """boto3's errors become ours: a switch against an unreachable store must refuse, not crash."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return call()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404"):
                raise DataNotFoundError(f"{self.url}: {what}: no such object") from exc
            raise ServerError(f"{self.url}: {what} failed: {code or exc}") from exc
        except BotoCoreError as exc:
            raise ServerError(f"{self.url}: {what} failed, the object store is unreachable: {exc}") from exc

    def read(self, key: str) -> bytes:
        body = self._call(f"reading {key}", lambda: self._s3.get_object(Bucket=self.bucket, Key=self._key(key)))
        return bytes(body["Body"].read())

    def write(self, key: str, data: bytes) -> None:
        self._call(f"writing {key}", lambda: self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data))

    def exists(self, key: str) -> bool:
        try:
            self._call(f"looking up {key}", lambda: self._s3.head_object(Bucket=self.bucket, Key=self._key(key)))
        except DataNotFoundError:
            return False
        except ServerError as exc:
            if "404" in str(exc) or "Not Found" in str(exc):
                return False
            raise
        return True

    def keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        paginator = self._s3.get_paginator("list_objects_v2")
        start = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in self._call(f"listing {prefix}", lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=start))):
            keys += [o["Key"][strip:] for o in page.get("Contents", [])]
        return sorted(keys)

    def delete(self, keys: Iterable[str]) -> None:
        batch = [{"Key": self._key(k)} for k in keys]
        for i in range(0, len(batch), 1000):
            chunk = batch[i : i + 1000]
            self._call("deleting", lambda c=chunk: self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": c}))

    def append_journal(self, event: str, **fields: Any) -> dict[str, Any]:
        entry = journal.entry(event, **fields)
        name = f"{JOURNAL_PREFIX}{entry['at']}-{journal.new_switch_id()}.json"
        self.write(name, json.dumps(entry, sort_keys=True, default=str).encode())
        return entry

    def read_journal(self) -> list[dict[str, Any]]:
        entries = []
        for key in self.keys(JOURNAL_PREFIX):
            try:
                entries.append(json.loads(self.read(key)))
            except (json.JSONDecodeError, DataNotFoundError):
                continue
        return sorted(entries, key=lambda e: str(e.get("at", "")))


def open_store(url: str | os.PathLike[str]) -> LocalStore | S3Store:
    """The store of a repository URL: s3://bucket/prefix, or a local folder."""
    text = str(url)
    if text.startswith("s3://"):
        return S3Store(text)
    root = Path(text)
    if not root.is_dir():
        raise DataNotFoundError(f"model repository {root} does not exist")
    return LocalStore(root)
