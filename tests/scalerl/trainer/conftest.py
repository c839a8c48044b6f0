"""Shared builders for the trainer tests: a tiny policy, rollout tables and in-memory collaborators."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pytest

from scalerl.config import load_config
from scalerl.models import build_tiny_model

VOCAB_LO, VOCAB_HI = 10, 100  # plain ASCII character tokens of the tiny tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny") / "model", seed=0, hidden_size=64, layers=2, heads=1
    )


def group_rows(
    run_id: str,
    shard_id: str,
    group_id: str,
    *,
    G: int,
    versions: list[int] | None = None,
    rewards: list[float] | None = None,
    seed: int = 0,
    prompt_len: int = 6,
    max_completion: int = 10,
) -> list[dict]:
    """G completion rows of one prompt; each completion spans `versions` (default [0])."""
    rng = random.Random(f"{seed}-{group_id}")
    versions = versions or [0]
    rewards = rewards if rewards is not None else [float(i % 2) for i in range(G)]
    prompt = [rng.randrange(VOCAB_LO, VOCAB_HI) for _ in range(prompt_len)]
    rows = []
    for i in range(G):
        n = rng.randint(max(len(versions), 2), max_completion)
        tokens = [rng.randrange(VOCAB_LO, VOCAB_HI) for _ in range(n)]
        # Token versions: non-decreasing, covering `versions` in order (an in-flight update).
        vs = sorted(versions[min(j * len(versions) // n, len(versions) - 1)] for j in range(n))
        rows.append(
            {
                "run_id": run_id,
                "shard_id": shard_id,
                "prompt_id": f"p-{group_id}",
                "group_id": group_id,
                "sample_index": i,
                "task": "arithmetic",
                "prompt": "x" * prompt_len,
                "prompt_token_ids": prompt,
                "answer": "1",
                "completion": "y" * n,
                "completion_token_ids": tokens,
                "logprobs": [-4.5 + rng.uniform(-0.3, 0.3) for _ in range(n)],
                "versions": vs,
                "finish_reason": ["stop", "length", "interrupted"][i % 3],
                "thinking_tokens": n // 2,
                "answer_tokens": n - n // 2,
                "reward": rewards[i],
                "passed": rewards[i] > 0,
                "reward_reason": "ok",
                "generator_id": "gen0",
                "started_at": 1_700_000_000.0,
                "finished_at": 1_700_000_001.0,
            }
        )
    return rows


def shard_table(run_id: str, shard_id: str, groups: list[tuple[str, list[int]]], G: int, **kw):
    """A valid rollout table with one group per (group_id, versions) entry."""
    from storage import rollouts_from_records

    rows = [
        r for gid, vs in groups for r in group_rows(run_id, shard_id, gid, G=G, versions=vs, **kw)
    ]
    return rollouts_from_records(rows)


def tiny_config(model_dir: Path, **sections):
    overrides = {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "generation": {"prompts_per_batch": 2, "samples_per_prompt": 4},
        "optimizer": {"lr": 1e-3, "warmup_steps": 2},
        "trainer": {"micro_batch_tokens": 64, "checkpoint_every": 3, "max_nan_steps": 1},
        "pipeline": {"max_off_policy_steps": 2},
        "schedule": {"max_steps": 6},
    }
    for name, values in sections.items():
        overrides[name] = {**overrides.get(name, {}), **values}
    items = [f"{s}.{k}={v}" for s, kv in overrides.items() for k, v in kv.items()]
    return load_config(preset="tiny-cpu", overrides=items)


class MemorySource:
    def __init__(self, tables: dict[str, pa.Table] | None = None) -> None:
        self.tables: dict[str, pa.Table] = dict(tables or {})
        self.reads: list[str] = []

    def list_ready(self) -> list[str]:
        return list(self.tables)

    def read(self, key: str) -> pa.Table:
        self.reads.append(key)
        return self.tables[key]

    def curriculum_version(self) -> int | None:
        return 7


class MemoryPublisher:
    def __init__(self) -> None:
        self.versions: dict[int, dict] = {}

    def publish(self, version, model, tokenizer, state_dict=None) -> None:
        sd = state_dict if state_dict is not None else model.state_dict()
        self.versions[version] = {k: v.detach().clone() for k, v in sd.items()}

    def latest_version(self):
        return max(self.versions) if self.versions else None


class MemoryCheckpoints:
    def __init__(self, root: Path) -> None:
        self.root, self.saved = root, []

    def latest_step(self):
        return max(self.saved) if self.saved else None

    def save(self, step, local_dir) -> None:
        import shutil

        dst = self.root / f"step-{step}"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(local_dir, dst)
        self.saved.append(step)

    def load(self, step, local_dir) -> Path:
        return self.root / f"step-{step}"


class MemoryMetrics:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def append(self, rows) -> None:
        self.rows.extend(rows)


@pytest.fixture
def kit():
    """The builders above, as one fixture (test modules must not import conftest)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        group_rows=group_rows,
        shard_table=shard_table,
        tiny_config=tiny_config,
        MemorySource=MemorySource,
        MemoryPublisher=MemoryPublisher,
        MemoryCheckpoints=MemoryCheckpoints,
        MemoryMetrics=MemoryMetrics,
    )
