"""Storage URLs and names: turn a root URL into an fsspec filesystem, and vet every name
that becomes part of a path so nothing can escape the root.

    loc = open_location("s3://bucket/runs", {"client_kwargs": {"endpoint_url": "http://..."}})
    loc.fs.ls(loc.root); loc.url_of(loc.root + "/r1")      # -> "s3://bucket/runs/r1"

Supported: local paths (relative, absolute, file://), s3:// (s3fs; endpoint and credentials
from storage_options or the usual AWS_* variables incl. AWS_ENDPOINT_URL) and memory://
(tests). S3 clients get short connect timeouts and few retries, so an unreachable endpoint
fails in seconds instead of minutes, and read an object with one GET (s3fs sends a HEAD first;
every request counts on a distant or slow store: bench/store_latency.py).
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from typing import Any

import fsspec

from storage.errors import (
    InvalidRunIdError,
    InvalidStorageUrlError,
    StorageCredentialsError,
    StoragePermissionError,
)

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


# S3 error codes that mean "these credentials are not accepted at all" (s3fs raises all of them,
# and AccessDenied, as PermissionError); any other 403 means "accepted, but not allowed here".
_REJECTED_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "NotSignedUp",
    "AccountProblem",
    "RequestTimeTooSkewed",
}
_WRITE_CALLS = {
    "put_object",
    "delete_object",
    "delete_objects",
    "copy_object",
    "create_multipart_upload",
    "upload_part",
    "upload_part_copy",
    "complete_multipart_upload",
    "abort_multipart_upload",
}


def s3_access_denied(
    url: str, endpoint: str, root: str, code: str = "", operation: str = ""
) -> StorageCredentialsError:
    """The one-line error for an S3 request that was refused (403): the URL asked for, the
    endpoint, the provider's error code and operation, and the S3 fix (never a secret)."""
    where = f"{url} (endpoint {endpoint})"
    on = f" on {operation}" if operation else ""
    bucket, _, prefix = root.partition("/")
    scope = f"{bucket}/{prefix}/*" if prefix else f"{bucket}/*"
    allowed = (
        f"a key allowed to read and write s3://{root}/ (s3:ListBucket on bucket {bucket}; "
        f"s3:GetObject, s3:PutObject and s3:DeleteObject on {scope})"
    )
    keys = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN, or AWS_PROFILE)"
    if code == "RequestTimeTooSkewed":
        return StorageCredentialsError(
            f"the request to {where} was refused ({code}{on}). Fix: set this machine's clock "
            "right (S3 refuses requests signed more than 15 minutes off)."
        )
    if code in _REJECTED_CODES:
        return StorageCredentialsError(
            f"the credentials for {where} were rejected ({code}{on}). Fix: check {keys}: the "
            "key must exist at this endpoint and the secret must be its own."
        )
    if not code or code.isdigit():  # a HEAD request: S3 sends no body, so no reason
        return StorageCredentialsError(
            f"access to {where} was refused (HTTP {code or 403}{on}: the key is unknown, its "
            f"secret wrong, or it lacks permission). Fix: check {keys}, and use {allowed}."
        )
    verb = "write to" if operation in _WRITE_CALLS else "read"
    return StorageCredentialsError(
        f"access to {where} was denied ({code}{on}): this key may not {verb} it. Fix: use "
        f"{allowed}, or pick a --storage root it may write; a read-only key can list and read "
        "runs but not start or resume one."
    )


def _s3_class() -> type:
    """S3FileSystem whose refused requests (403) raise s3_access_denied, naming the object's
    URL, instead of s3fs' bare PermissionError('Access Denied'/'Forbidden'). Built on first use
    (s3fs is imported only for s3:// roots) and reachable as storage.paths._GuardedS3FileSystem,
    so instances pickle by reference."""
    import s3fs
    from fsspec.asyn import sync_wrapper

    class _GuardedS3FileSystem(s3fs.S3FileSystem):
        def __init__(self, *args: Any, scalerl_root: str | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.scalerl_root = scalerl_root  # bucket/prefix of the run store (kept by pickle)

        async def _call_s3(self, method, *akwarglist, **kwargs):
            try:
                return await super()._call_s3(method, *akwarglist, **kwargs)
            except StorageCredentialsError:
                raise
            except PermissionError as err:
                cause = getattr(err.__cause__, "response", None) or {}
                code = str((cause.get("Error") or {}).get("Code") or "")
                bucket, key = kwargs.get("Bucket") or "", kwargs.get("Key") or kwargs.get("Prefix")
                root = self.scalerl_root or bucket
                if key:
                    url = f"s3://{bucket}/{key}"
                else:  # a bucket-level request (HeadBucket): name the store's root
                    url = f"s3://{root if root.split('/')[0] == bucket else bucket}"
                raise s3_access_denied(
                    url, _s3_endpoint(self.storage_options), root, code, str(method)
                ) from None

        call_s3 = sync_wrapper(_call_s3)  # the base class's wraps its own _call_s3

        async def _cat_file(self, path, version_id=None, start=None, end=None, **kwargs):
            # One GET. s3fs sends a HEAD first to decide on ranged parallel GETs (files over
            # default_block_size, 50 MiB), and for a missing key a HEAD and a LIST: two
            # requests where one does, on every marker, status, record and shard read.
            kwargs.setdefault("max_concurrency", 1)
            return await super()._cat_file(path, version_id, start, end, **kwargs)

    _GuardedS3FileSystem.__module__ = __name__
    _GuardedS3FileSystem.__qualname__ = "_GuardedS3FileSystem"
    return _GuardedS3FileSystem


_S3_CLASS_LOCK = threading.Lock()


def _guarded_s3_class() -> type:
    with _S3_CLASS_LOCK:  # one class object: pickle checks that the name resolves to it
        cls = globals().get("_GuardedS3FileSystem")
        if cls is None:
            cls = globals()["_GuardedS3FileSystem"] = _s3_class()
        return cls


def __getattr__(name: str) -> Any:
    if name == "_GuardedS3FileSystem":
        return _guarded_s3_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        root = f"{bucket}/{prefix}" if prefix else bucket
        # fsspec.filesystem("s3"), but a refused request names the URL it asked for
        fs = _guarded_s3_class()(scalerl_root=root, **merged)
        fs.retries = _S3_RETRIES
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
