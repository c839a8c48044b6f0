"""Storage URLs and names: turn a root URL into an fsspec filesystem, and vet every name
that becomes part of a path so nothing can escape the root.

    loc = open_location("s3://bucket/runs", {"client_kwargs": {"endpoint_url": "http://..."}})
    loc.fs.ls(loc.root); loc.url_of(loc.root + "/r1")      # -> "s3://bucket/runs/r1"

Supported: local paths (relative, absolute, file://), s3:// (s3fs; endpoint and credentials
from storage_options or the usual AWS_* variables incl. AWS_ENDPOINT_URL) and memory://
(tests). S3 clients get short connect timeouts and few retries, so an unreachable endpoint
fails in seconds instead of minutes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import fsspec

from storage.errors import InvalidRunIdError, InvalidStorageUrlError, StoragePermissionError

MAX_NAME_LEN = 128
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_S3_DEFAULTS: dict[str, Any] = {
    "config_kwargs": {
        "connect_timeout": 3,
        "read_timeout": 60,
        "retries": {"max_attempts": 2, "mode": "standard"},
    },
    "use_listings_cache": False,  # other processes commit; never trust a cached listing
    "skip_instance_cache": True,
}
_S3_RETRIES = 2  # s3fs' own retry loop (class default 5, with back-off)


def validate_name(value: object, what: str = "run id") -> str:
    """Return `value` if it is a safe path component: 1-128 chars of [A-Za-z0-9._-], starting
    with a letter or digit (so no '.', '..', hidden or temp names); else InvalidRunIdError."""
    if not isinstance(value, str) or not value:
        raise InvalidRunIdError(
            f"{what} {value!r} is empty or not a string. Fix: use 1-{MAX_NAME_LEN} characters "
            "from [A-Za-z0-9._-], e.g. 'run-2026-01-01'."
        )
    if len(value) > MAX_NAME_LEN:
        raise InvalidRunIdError(
            f"{what} {value[:40]!r}... is {len(value)} characters long. "
            f"Fix: use at most {MAX_NAME_LEN} characters."
        )
    if not _NAME_RE.fullmatch(value):
        raise InvalidRunIdError(
            f"{what} {value!r} contains characters outside [A-Za-z0-9._-] or does not start "
            "with a letter or digit ('/', '..' and spaces are not allowed). "
            "Fix: use only letters, digits, '.', '_' and '-', starting with a letter or digit."
        )
    return value


@dataclass(frozen=True)
class Location:
    """A filesystem plus the root path inside it, and how to print paths as URLs."""

    fs: Any  # fsspec.AbstractFileSystem
    root: str  # path as the filesystem wants it, without scheme
    protocol: str  # "file", "s3" or "memory"
    endpoint: str  # where requests go, for error messages (never credentials)

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    def join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def url_of(self, path: str) -> str:
        """Full URL that pyarrow, DuckDB and polars accept (plain path for local files)."""
        if self.protocol == "file":
            return path
        return f"{self.protocol}://{path.lstrip('/')}"


def _merge(defaults: dict, given: dict) -> dict:
    out = dict(defaults)
    for k, v in given.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _s3_endpoint(options: dict) -> str:
    endpoint = (options.get("client_kwargs") or {}).get("endpoint_url") or options.get(
        "endpoint_url"
    )
    endpoint = (
        endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )
    return endpoint or "the default AWS S3 endpoint"


def open_location(url: str, storage_options: dict | None = None) -> Location:
    """Parse a root URL and open its filesystem (no network traffic yet)."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidStorageUrlError(
            f"storage URL {url!r} is empty. Fix: pass a local directory such as './runs' "
            "or 's3://bucket/prefix'."
        )
    options = dict(storage_options or {})
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "file", url
    scheme = scheme.lower()
    if scheme == "file":
        root = os.path.abspath(os.path.expanduser(rest)).rstrip("/") or "/"
        return Location(fsspec.filesystem("file", **options), root, "file", "local disk")
    if scheme in ("s3", "s3a"):
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise InvalidStorageUrlError(
                f"storage URL {url!r} names no bucket. Fix: use s3://BUCKET/PREFIX, "
                "e.g. s3://my-bucket/scalerl-runs."
            )
        if not _BUCKET_RE.fullmatch(bucket):
            raise InvalidStorageUrlError(
                f"storage URL {url!r}: {bucket!r} is not a valid bucket name. Fix: use 3-63 "
                "lower-case letters, digits, '.' or '-'."
            )
        prefix = "/".join(p for p in rest.split("/")[1:] if p)
        if any(p in (".", "..") for p in prefix.split("/")):
            raise InvalidStorageUrlError(
                f"storage URL {url!r} contains '.' or '..'. Fix: give a plain prefix."
            )
        merged = _merge(_S3_DEFAULTS, options)
        fs = fsspec.filesystem("s3", **merged)
        fs.retries = _S3_RETRIES
        root = f"{bucket}/{prefix}" if prefix else bucket
        return Location(fs, root, "s3", _s3_endpoint(merged))
    if scheme == "memory":
        fs = fsspec.filesystem("memory", **options)
        return Location(fs, "/" + rest.strip("/"), "memory", "in-process memory")
    raise InvalidStorageUrlError(
        f"storage URL {url!r} has unsupported scheme '{scheme}://'. Fix: use a local path, "
        "file://, s3://bucket/prefix (AWS, MinIO, Ceph, R2 via AWS_ENDPOINT_URL) or memory://."
    )


def check_local_access(loc: Location) -> None:
    """For a local root: raise StoragePermissionError unless this user can list and write it,
    or, before it exists, create it (its nearest existing parent must be a writable directory).
    Writes nothing. Object stores check their permissions per request."""
    if not loc.is_local:
        return
    path = loc.root
    while not os.path.exists(path):
        path = os.path.dirname(path)
    fix = (
        "Fix: pick a storage root this user may write (--storage or storage.url), or grant "
        "access (e.g. `chmod u+rwx`)."
    )
    if not os.path.isdir(path):
        raise StoragePermissionError(
            f"storage root {loc.root}: {path} is a file, not a directory. Fix: pick a storage "
            "root that is a directory or does not exist yet (--storage or storage.url)."
        )
    needed = os.R_OK | os.W_OK | os.X_OK if path == loc.root else os.W_OK | os.X_OK
    if not os.access(path, needed):
        what = "is not readable and writable" if path == loc.root else "cannot be created in"
        where = "" if path == loc.root else f" {path}"
        raise StoragePermissionError(
            f"storage root {loc.root} {what}{where} by this user (permission denied). {fix}"
        )
