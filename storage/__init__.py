"""Object storage for ScaleRL runs: rollout schema, run layout, atomic commits, weight
versions, checkpoints, metrics. Local disk, S3 (s3fs) or memory://, one code path (fsspec).

    from storage import open_store
    run = open_store("./runs").run("run-1", create=True)

See storage/store.py for the layout and docs/ROLLOUT_SCHEMA.md for the rollout fields.
"""

from storage.schema import (
    PROMPT_SCHEMA,
    ROLLOUT_SCHEMA,
    SCHEMA_VERSION,
    rollouts_from_records,
    validate_rollouts,
)
from storage.shards import ShardInfo
from storage.store import Run, RunStore, open_store

__all__ = [
    "PROMPT_SCHEMA",
    "ROLLOUT_SCHEMA",
    "SCHEMA_VERSION",
    "Run",
    "RunStore",
    "ShardInfo",
    "open_store",
    "rollouts_from_records",
    "validate_rollouts",
]
