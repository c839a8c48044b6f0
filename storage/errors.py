"""Errors raised by the run store.

Every error names the thing that is wrong and the fix ("... Fix: ..."), and never contains
a secret (credentials are never formatted into messages). All derive from StoreError so a
caller can catch the whole family; lookups also derive from LookupError and bad arguments
from ValueError, so generic handlers keep working.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every storage error."""


class InvalidInputError(StoreError, ValueError):
    """An argument cannot be stored as given (wrong type, missing column, missing directory)."""


class InvalidRunIdError(InvalidInputError):
    """A run id, stage, shard key, split or metric name is empty, too long or unsafe."""


class InvalidStorageUrlError(InvalidInputError):
    """The storage URL has an unsupported scheme or lacks a bucket."""


class InvalidRolloutsError(InvalidInputError):
    """A rollout table does not follow the rollout schema (storage.schema)."""


class RunNotFoundError(StoreError, LookupError):
    """The run directory does not exist and create=False."""


class RunDeletedError(RunNotFoundError, ValueError):
    """The run's directory was deleted while a writer was writing it (its lease file or run
    marker is gone): the writer stops and re-creates nothing. A ValueError: no retry can
    bring the run back."""


class NotCommittedError(StoreError, LookupError):
    """A config, prompt split, weight version or checkpoint was never committed."""


class ShardNotFoundError(NotCommittedError):
    """No commit record exists for this (stage, key)."""


class StorageUnreachableError(StoreError, ConnectionError):
    """The object-storage endpoint does not answer."""


class StorageCredentialsError(StoreError, PermissionError):
    """Credentials are missing or rejected."""


class StoragePermissionError(StoreError, PermissionError):
    """A local storage root (or the directory it would be created in) may not be written."""


class BucketNotFoundError(StoreError, LookupError):
    """The bucket named in an s3:// URL does not exist on the endpoint."""


class StorageFullError(StoreError, OSError):
    """The storage has no space (or quota) left for a write."""


class CorruptShardError(StoreError):
    """A committed data file is missing, truncated or not valid Parquet."""


class SchemaVersionError(StoreError):
    """A shard was written with another rollout schema version."""


class ForeignFileError(StoreError):
    """A file in the run layout was not written by this store (or belongs to another run)."""


class CommitConflictError(StoreError):
    """Different content was committed under a key that is already committed."""


class ConfigMismatchError(CommitConflictError, ValueError):
    """A run was started or resumed with a config that differs from its run.json. A ValueError:
    bad input, which no retry can fix."""
