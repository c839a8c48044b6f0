"""Low-level file operations with the atomicity the commit protocol relies on.

- write_atomic: a reader sees the old file or the whole new one. Local disk: write a
  '.tmp-*' sibling, then os.replace. S3 and memory: a single PUT is already atomic.
- create_exclusive: write only if absent (commit records). Local: os.link of a temp file
  (fails if the target exists); S3: PUT with If-None-Match: * (s3fs mode="create").
- within=RUN_ROOT (write_atomic, create_exclusive): a run directory deleted while its writer
  runs is never re-created; RunDeletedError (run_deleted: the one line) instead.
- put_unreferenced: large payloads (shard data) that need not be atomic because nothing
  points at them until a commit record does.
- guarded: maps botocore/s3fs failures to StorageUnreachableError / StorageCredentialsError
  with the endpoint in the message and no secret.
- fault_point: test seam. When SCALERL_STORAGE_FAULT equals the point's name the writer
  sleeps there (SCALERL_STORAGE_FAULT_SLEEP seconds, default 300) so a test can SIGKILL it at
  a known place. Costs one environment lookup.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import functools
import os
import shutil
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from storage.errors import (
    BucketNotFoundError,
    RunDeletedError,
    StorageCredentialsError,
    StorageFullError,
    StoragePermissionError,
    StorageUnreachableError,
    StoreError,
)
from storage.paths import Location, s3_access_denied

TMP_PREFIX = ".tmp-"
FAULT_ENV = "SCALERL_STORAGE_FAULT"

F = TypeVar("F", bound=Callable[..., Any])


def fault_point(name: str) -> None:
    if os.environ.get(FAULT_ENV) == name:
        time.sleep(float(os.environ.get(FAULT_ENV + "_SLEEP", "300")))


def tmp_name(path: str) -> str:
    head, _, base = path.rpartition("/")
    return f"{head}/{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{base}"


def _local_parent(path: str, within: str | None = None) -> None:
    if within is not None and not os.path.isdir(within):
        raise run_deleted(None, within)  # never re-create a run directory that is gone
    os.makedirs(os.path.dirname(path), exist_ok=True)


def run_deleted(loc: Location | None, run_root: str) -> RunDeletedError:
    """The one line for a run whose directory was deleted while a writer wrote it."""
    store, _, run_id = run_root.rstrip("/").rpartition("/")
    where = store if loc is None else loc.url_of(store)
    return RunDeletedError(
        f"run {run_id} was deleted from {where} while it ran: its writer stops and writes "
        "nothing more (a deleted run is never re-created). Fix: if that was a mistake, restore "
        f"the run's directory from a copy and `scalerl resume {run_id}`; otherwise start a new "
        "run (`scalerl run`)."
    )


def write_atomic(loc: Location, path: str, data: bytes, *, within: str | None = None) -> None:
    """within: a run directory that must still exist (local disk: RunDeletedError if it is
    gone, and no directory is made)."""
    if not loc.is_local:
        loc.fs.pipe_file(path, data)
        return
    _local_parent(path, within)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quiet(tmp)
        raise


def create_exclusive(loc: Location, path: str, data: bytes, *, within: str | None = None) -> bool:
    """Write `data` at `path` unless something is already there; return whether we wrote.
    within: as for write_atomic."""
    if not loc.is_local:
        try:
            loc.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True
    _local_parent(path, within)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)  # atomic, and fails instead of replacing
        except FileExistsError:
            raise
        except OSError:  # no hard links here (some network/FUSE mounts): O_EXCL + one write
            with open(path, "xb") as f:
                f.write(data)
    except FileExistsError:
        return False
    finally:
        _unlink_quiet(tmp)
    return True


def copy_file(loc: Location, src: str, dst: str) -> bool:
    """Copy src to dst (whole or not at all on local disk); False if src is missing. Used by
    the quarantines of shards and checkpoints: nothing is deleted before its copy exists."""
    if not loc.is_local:
        try:
            loc.fs.copy(src, dst)
        except FileNotFoundError:
            return False
        return True
    if not os.path.isfile(src):
        return False
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = tmp_name(dst)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        _unlink_quiet(tmp)
    return True


def put_unreferenced(loc: Location, path: str, data: bytes, fault: str) -> None:
    """Upload a payload that no reader can see yet (nothing refers to it), in one PUT."""
    fault_point(fault + ".before")
    loc.fs.pipe_file(path, data)


def read_bytes(loc: Location, path: str) -> bytes:
    return loc.fs.cat_file(path)


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def mtime(info: dict) -> float:
    """Modification time (epoch s) from an fsspec info dict of any of our backends."""
    for key in ("mtime", "LastModified", "created"):
        value = info.get(key)
        if isinstance(value, dt.datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
    return 0.0


def ls(loc: Location, path: str) -> list[dict]:
    """Children of `path` with details; [] if it does not exist."""
    try:
        return loc.fs.ls(path, detail=True)
    except FileNotFoundError as err:
        if "bucket" in str(err).lower():
            raise  # a missing bucket is an error, not an empty directory
        return []


def basename(info: dict) -> str:
    return info["name"].rstrip("/").rsplit("/", 1)[-1]


def _translate(loc: Location, err: BaseException) -> StoreError | None:
    names = {c.__name__ for c in type(err).__mro__}
    where = f"{loc.url_of(loc.root)} (endpoint {loc.endpoint})"
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"} or (
        loc.protocol == "s3" and names & {"ReadTimeoutError", "ConnectionError"}
    ):
        return StorageUnreachableError(
            f"object storage at {where} does not answer ({type(err).__name__}). Fix: check the "
            "endpoint URL (AWS_ENDPOINT_URL or storage_options client_kwargs.endpoint_url), "
            "that the server is running, and the network between here and there."
        )
    if names & {"NoCredentialsError", "PartialCredentialsError"}:
        return StorageCredentialsError(
            f"no credentials found for {where}. Fix: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass storage_options key/secret."
        )
    if loc.protocol == "s3" and isinstance(err, PermissionError):
        # storage.paths' S3 filesystem names the object for the requests it makes; this is the
        # fallback for a 403 raised elsewhere: the root's URL, the code s3fs kept, the S3 fix.
        response = getattr(err.__cause__, "response", None) or {}
        code = str((response.get("Error") or {}).get("Code") or "")
        return s3_access_denied(loc.url_of(loc.root), loc.endpoint, loc.root, code)
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return _full_error(loc, err)
    if loc.is_local and isinstance(err, PermissionError):
        return StoragePermissionError(
            f"permission denied: {getattr(err, 'filename', None) or where}. Fix: run as a user "
            "that may read and write it, grant access (e.g. `chmod u+rwx`), or pick another "
            "--storage root."
        )
    if loc.protocol == "s3" and isinstance(err, FileNotFoundError) and "bucket" in str(err):
        return BucketNotFoundError(
            f"bucket of {where} does not exist. Fix: create it (e.g. `aws s3 mb`) "
            "or correct the storage URL."
        )
    return None


def _full_error(loc: Location, err: OSError) -> StorageFullError:
    """ENOSPC/EDQUOT named where it happened: the file being written is the copy's destination
    (filename2; filename is then its source, e.g. a staging file under TMPDIR). Inside a local
    run store: the store is full; elsewhere (TMPDIR, a staging directory, any local file of an S3
    run): that file system is, not the store."""
    dest = getattr(err, "filename2", None) or getattr(err, "filename", None)
    resume = "then continue the run with `scalerl resume RUN_ID`: what was committed is intact."
    root = os.path.abspath(loc.root) if loc.is_local else None
    if dest is None or (root is not None and _inside(os.path.abspath(dest), root)):
        return StorageFullError(
            f"no space left on the storage of {loc.url_of(loc.root)} (writing "
            f"{dest or 'a file'}). Fix: free space there or raise the quota (or move the run "
            f"to a larger disk), {resume}"
        )
    mount = _mount_point(os.path.dirname(os.path.abspath(dest)))
    return StorageFullError(
        f"no space left on the local file system at {mount} (writing {dest}), not on the run "
        f"store {loc.url_of(loc.root)}. Fix: free space on {mount}, or point TMPDIR (temporary "
        f"and staging files) at a disk with room, {resume}"
    )


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _mount_point(path: str) -> str:
    """The mount point of the file system holding `path` (its nearest existing ancestor's)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def guarded(method: F) -> F:
    """Decorate a method of an object with a `_loc` attribute: translate storage failures."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except StoreError:
            raise
        except Exception as err:
            mapped = _translate(self._loc, err)
            if mapped is None:
                raise
            # `from None`: provider messages may quote request headers; keep them out.
            raise mapped from None

    return wrapper  # type: ignore[return-value]
