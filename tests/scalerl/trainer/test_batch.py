"""Batch assembly: the staleness rule, the wait rule, whole groups, counting (batch.py)."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from scalerl.trainer.batch import BatchAssembler, ShardRejected, rollout_stats

RUN = "run-a"


def table(groups: list[tuple[str, int, int]], G: int, run_id: str = RUN, rewards=None) -> pa.Table:
    """Minimal trainer-side rollout table: (group_id, min_version, max_version) x G rows."""
    rows = []
    for gid, lo, hi in groups:
        for i in range(G):
            rows.append(
                {
                    "run_id": run_id,
                    "group_id": gid,
                    "sample_index": i,
                    "prompt_token_ids": [1, 2],
                    "completion_token_ids": [3, 4, 5],
                    "logprobs": [-1.0, -1.0, -1.0],
                    "min_version": lo,
                    "max_version": hi,
                    "finish_reason": ["stop", "length", "interrupted", "stop"][i % 4],
                    "thinking_tokens": 2,
                    "answer_tokens": 1,
                    "reward": float(i % 2) if rewards is None else rewards[i],
                    "passed": bool(i % 2) if rewards is None else rewards[i] > 0,
                }
            )
    return pa.Table.from_pylist(rows)


# One event: ("train",) | ("pickup", lag) | ("commit", n_groups, max_age, duplicate)
events = st.lists(
    st.one_of(
        st.just(("train",)),
        st.just(("train",)),
        st.tuples(st.just("pickup"), st.integers(0, 3)),
        st.just(("pickup", 0)),
        st.tuples(st.just("commit"), st.integers(1, 3), st.integers(0, 4), st.booleans()),
    ),
    min_size=5,
    max_size=80,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=events, k=st.integers(0, 3), P=st.integers(1, 2), G=st.integers(2, 3))
def test_staleness_and_wait_rules_hold_for_any_interleaving(events, k, P, G):
    asm = BatchAssembler(RUN, prompts_per_batch=P, samples_per_prompt=G, max_off_policy_steps=k)
    v = 0  # trainer version; weights 0..v are published
    g = 0  # version the generators run now (picked up from the published ones)
    shards: dict[str, pa.Table] = {}
    groups: dict[str, tuple[int, int]] = {}  # group id -> (min_version, max_version)
    trained: list[str] = []
    offered = 0
    for n, ev in enumerate(events):
        if ev[0] == "pickup":
            g = max(g, v - ev[1])  # generators pick up some published version, maybe late
        elif ev[0] == "commit":
            _, n_groups, max_age, duplicate = ev
            spec = []
            for j in range(n_groups):
                gid = f"g{n}-{j}"
                # In-flight sequences started under older weights and finished under g.
                lo = max(0, g - max_age * ((n + j) % 2))
                groups[gid] = (lo, g)
                spec.append((gid, lo, g))
            if duplicate and groups:  # a retried commit under a new key re-sends a group
                old = next(iter(groups))
                spec.append((old, *groups[old]))
            shards[f"s{n}"] = table(spec, G)
        else:
            for key, t in shards.items():
                if not asm.is_read(key):
                    asm.add(key, t)
                    offered += t.num_rows
            truth = max((hi for _, hi in groups.values()), default=None)
            batch = asm.take(v)
            if batch is not None:
                # Wait rule: never more than k ahead of the generators' newest version.
                assert truth is not None and v - truth <= k
                rows = batch.table.to_pylist()
                assert len(rows) == P * G
                assert len({r["group_id"] for r in rows}) == P  # whole groups
                for r in rows:
                    assert v - r["min_version"] <= k  # staleness rule
                    assert r["max_version"] <= v
                    if k == 0:  # strictly on-policy: every token from version v
                        assert r["min_version"] == r["max_version"] == v
                assert sum(batch.staleness.values()) == P * G
                assert set(batch.staleness) <= set(range(k + 1))
                trained += [gid for gids in batch.shards.values() for gid in gids]
                v += 1
    assert len(trained) == len(set(trained))  # nothing trained twice
    totals = asm.totals
    event(f"batches taken: {'some' if trained else 'none'}")
    event(f"stale drops: {'some' if totals['dropped_stale'] else 'none'}")
    assert totals["offered"] == offered
    # kept + dropped = offered (duplicates and still-buffered rows accounted separately).
    assert totals["batched"] == len(trained) * G
    assert (
        totals["batched"] + totals["dropped_stale"] + totals["duplicates"] + asm.pending == offered
    )
    # Every dropped-as-stale group really was too old for some step the trainer reached.
    pending_or_trained = set(trained) | set(asm._groups)
    read_groups = {
        r for key in shards if asm.is_read(key) for r in shards[key]["group_id"].to_pylist()
    }
    for gid in read_groups - pending_or_trained:
        assert v - groups[gid][0] > k


def test_group_with_one_stale_completion_is_dropped_whole_and_counted():
    asm = BatchAssembler(RUN, prompts_per_batch=1, samples_per_prompt=2, max_off_policy_steps=1)
    t = table([("a", 0, 2), ("b", 2, 2)], G=2)
    # Row 0 of group a starts at version 0 (stale at v=2 with k=1), row 1 at version 2.
    mins = [0, 2, 2, 2]
    t = t.set_column(t.schema.get_field_index("min_version"), "min_version", pa.array(mins))
    asm.add("s0", t)
    batch = asm.take(2)
    assert batch is not None and batch.table["group_id"].to_pylist() == ["b", "b"]
    assert batch.intake.dropped_stale == 2 and batch.intake.stale_groups == {"s0": ["a"]}
    assert batch.staleness == {0: 2}


def test_groups_spanning_shards_wait_until_complete():
    asm = BatchAssembler(RUN, prompts_per_batch=1, samples_per_prompt=4, max_off_policy_steps=8)
    full = table([("a", 0, 0)], G=4)
    asm.add("s0", full.slice(0, 3))
    assert asm.take(0) is None and asm.pending == 3
    asm.add("s1", full.slice(3, 1))
    batch = asm.take(0)
    assert batch is not None and batch.shards == {"s0": ["a"], "s1": ["a"]}
    assert sorted(batch.table["sample_index"].to_pylist()) == [0, 1, 2, 3]


def test_future_versions_are_held_until_the_trainer_reaches_them():
    asm = BatchAssembler(RUN, prompts_per_batch=1, samples_per_prompt=2, max_off_policy_steps=0)
    asm.add("s0", table([("a", 3, 3)], G=2))
    assert asm.take(2) is None and asm.pending == 2  # held, not dropped
    assert asm.take(3) is not None


def test_duplicates_are_dropped_and_counted():
    asm = BatchAssembler(RUN, prompts_per_batch=1, samples_per_prompt=2, max_off_policy_steps=8)
    asm.add("s0", table([("a", 0, 0)], G=2))
    assert asm.take(0) is not None
    asm.add("s0-retry", table([("a", 0, 0)], G=2))
    assert asm.take(1) is None
    assert asm.totals["duplicates"] == 2 and asm.pending == 0


def test_foreign_run_and_unscored_shards_are_rejected_and_recorded():
    asm = BatchAssembler(RUN, prompts_per_batch=1, samples_per_prompt=2, max_off_policy_steps=8)
    with pytest.raises(ShardRejected, match="run-b"):
        asm.add("x", table([("a", 0, 0)], G=2, run_id="run-b"))
    unscored = table([("b", 0, 0)], G=2)
    unscored = unscored.set_column(
        unscored.schema.get_field_index("reward"), "reward", pa.array([None, None], pa.float64())
    )
    with pytest.raises(ShardRejected, match="unscored"):
        asm.add("y", unscored)
    with pytest.raises(ShardRejected, match="lacks column"):
        asm.add("z", table([("c", 0, 0)], G=2).drop_columns(["min_version"]))
    assert asm.is_read("x") and asm.is_read("y") and asm.totals["shards_rejected"] == 3
    assert asm.take(0) is None and asm.totals["offered"] == 0  # never trained on


def test_state_dict_restore_rebuilds_the_same_buffer():
    asm = BatchAssembler(RUN, prompts_per_batch=1, samples_per_prompt=2, max_off_policy_steps=8)
    shards = {"s0": table([("a", 0, 0), ("b", 0, 0)], G=2), "s1": table([("c", 0, 0)], G=2)}
    for key, t in shards.items():
        asm.add(key, t)
    asm.take(0)
    again = BatchAssembler(RUN, prompts_per_batch=1, samples_per_prompt=2, max_off_policy_steps=8)
    again.restore(asm.state_dict(), read=shards.__getitem__)
    assert again.state_dict() == asm.state_dict()
    assert again.take(1).table.equals(asm.take(1).table)


def test_rollout_stats_follow_their_definitions():
    t = table([("a", 0, 0)], G=4)  # rewards 0,1,0,1; reasons stop,length,interrupted,stop
    s = rollout_stats(t)
    assert s["pass_rate"] == 0.5 and s["reward_mean"] == 0.5
    assert s["truncation_rate"] == 0.25 and s["interruption_rate"] == 0.25
    assert s["completion_len_mean"] == 3 and s["prompt_len_mean"] == 2
