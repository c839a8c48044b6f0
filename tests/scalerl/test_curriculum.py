"""No-Positive-Resampling: retirement at pass rate >= 0.9, seeded epochs, state round trip."""

import json

import pytest

from scalerl.curriculum import CurriculumExhausted, NoPositiveResampling

IDS = [f"p{i:02d}" for i in range(10)]


def test_retires_at_threshold_but_not_below():
    cur = NoPositiveResampling(IDS, pass_rate_threshold=0.9)
    assert cur.update("p00", 89, total=100) is False  # 0.89 < 0.9
    assert "p00" in cur.active_ids
    assert cur.update("p01", 90, total=100) is True  # 0.90 >= 0.9
    assert cur.update("p02", [True] * 9 + [False]) is True  # 9/10 == 0.9 exactly
    assert cur.update("p03", [True] * 15 + [False]) is True  # G=16: 15/16 retires
    assert cur.update("p04", [True] * 14 + [False] * 2) is False  # 14/16 = 0.875 does not
    assert cur.retired_ids == ["p01", "p02", "p03"]
    assert cur.pass_rate("p00") == pytest.approx(0.89)
    assert cur.pass_rate("p05") is None


def test_pass_rate_pools_groups_of_the_latest_epoch_only():
    cur = NoPositiveResampling(IDS, seed=1)
    cur.sample(len(IDS))  # epoch 0: every prompt handed out once
    # Two groups of p01 in epoch 0 pool to 12/16 = 0.75 -> stays.
    assert cur.update("p01", 7, total=8) is False
    assert cur.update("p01", 5, total=8) is False
    assert cur.pass_rate("p01") == pytest.approx(12 / 16)
    cur.sample(len(IDS))  # epoch 1
    assert cur.epoch == 1
    # Epoch 1: only the new group counts (the old 0.75 is history): 15/16 retires.
    assert cur.update("p01", 15, total=16) is True
    assert cur.history("p01") == [(0, 7, 8), (0, 5, 8), (1, 15, 16)]


def test_untagged_groups_count_alone_and_explicit_epochs_pool():
    updater = NoPositiveResampling(IDS)  # never samples, like a separate update task
    assert updater.update("p00", 5, total=8) is False
    assert updater.update("p00", 8, total=8) is True  # latest group alone: 1.0 (pooled: 0.81)
    assert updater.history("p00") == [(None, 5, 8), (None, 8, 8)]
    assert updater.update("p01", 5, total=8, epoch=3) is False
    assert updater.update("p01", 8, total=8, epoch=3) is False  # same epoch: 13/16 = 0.81
    assert updater.pass_rate("p01") == pytest.approx(13 / 16)


def test_retire_applies_decisions_from_another_process():
    updater = NoPositiveResampling(IDS)
    updater.update("p03", 16, total=16)
    sampler = NoPositiveResampling(IDS, seed=2)
    sampler.sample(3)
    saved = json.loads(json.dumps(updater.state_dict()))
    assert sampler.retire(saved["retired"]) == ["p03"]
    assert sampler.retire(saved["retired"]) == []  # idempotent
    assert "p03" not in sampler.sample(5 * len(IDS))
    with pytest.raises(KeyError, match="unknown prompt id"):
        sampler.retire(["nope"])


def test_retired_prompts_are_never_sampled_again():
    cur = NoPositiveResampling(IDS, seed=3)
    first = cur.sample(5)  # half of epoch 0
    retired = set(first[:3])
    for pid in first[:3]:
        cur.update(pid, 10, total=10)
    for pid in first[3:]:
        cur.update(pid, 1, total=10)
    later = cur.sample(10 * len(IDS))  # rest of epoch 0 and many later epochs
    assert not retired & set(later)
    assert set(later) == set(IDS) - retired
    # Every later epoch is a full pass over the 7 active prompts.
    assert cur.epoch >= 5


def test_epoch_is_a_shuffled_pass_and_wraps():
    cur = NoPositiveResampling(IDS, seed=0)
    a = cur.sample(len(IDS))
    assert sorted(a) == sorted(IDS)
    assert cur.epoch == 0
    b = cur.sample(len(IDS) + 3)  # wraps into epoch 2
    assert sorted(b[: len(IDS)]) == sorted(IDS)
    assert cur.epoch == 2
    assert a != b[: len(IDS)]  # a new shuffle per epoch
    assert cur.sample(0) == []


def test_same_seed_and_updates_give_same_samples():
    def run(seed):
        cur = NoPositiveResampling(IDS, seed=seed)
        out = []
        for step in range(12):
            batch = cur.sample(4)
            out.append(batch)
            for j, pid in enumerate(batch):
                cur.update(pid, 10 if (step + j) % 5 == 0 else 3, total=10)
        return out

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_state_round_trip_mid_epoch_continues_identically():
    cur = NoPositiveResampling(IDS, seed=5)
    for pid in cur.sample(4):
        cur.update(pid, [True, True, False, False])
    cur.update(cur.sample(1)[0], 16, total=16)  # retire one mid-epoch
    state = json.loads(json.dumps(cur.state_dict()))  # must survive JSON
    restored = NoPositiveResampling.from_state_dict(state)
    same = NoPositiveResampling(IDS)
    same.load_state_dict(state)
    expected = cur.sample(25)
    assert restored.sample(25) == expected
    assert same.sample(25) == expected
    assert restored.version == cur.version == 5
    assert restored.retired_ids == cur.retired_ids
    assert restored.history(cur.retired_ids[0]) == cur.history(cur.retired_ids[0])


def test_load_state_rejects_other_prompt_sets():
    state = NoPositiveResampling(IDS).state_dict()
    with pytest.raises(ValueError, match="different prompt set"):
        NoPositiveResampling(IDS[:5]).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        NoPositiveResampling(IDS).load_state_dict({"format": 1})


def test_exhaustion_raises_with_a_clear_message():
    cur = NoPositiveResampling(IDS[:3], seed=0)
    for pid in IDS[:3]:
        cur.update(pid, 16, total=16)
    assert cur.exhausted
    with pytest.raises(CurriculumExhausted) as info:
        cur.sample(1)
    message = str(info.value)
    assert "every prompt is retired" in message and "3 prompts" in message
    assert "run can end" in message and "pass_rate_threshold" in message


def test_version_counts_every_update_and_late_groups_change_nothing():
    cur = NoPositiveResampling(IDS)
    assert cur.update("p00", 10, total=10) is True
    assert cur.update("p00", 0, total=10) is False  # in flight when it retired
    assert cur.retired_ids == ["p00"]
    assert cur.version == 2


def test_bad_input():
    cur = NoPositiveResampling(IDS)
    with pytest.raises(KeyError, match="unknown prompt id 'nope'"):
        cur.update("nope", 1, total=2)
    with pytest.raises(ValueError, match="total"):
        cur.update("p00", 3)
    with pytest.raises(ValueError, match="passed <= total"):
        cur.update("p00", 5, total=4)
    with pytest.raises(ValueError, match="unique"):
        NoPositiveResampling(["a", "a"])
    with pytest.raises(ValueError, match="no prompt ids"):
        NoPositiveResampling([])
    with pytest.raises(ValueError, match="pass_rate_threshold"):
        NoPositiveResampling(IDS, pass_rate_threshold=1.5)
    with pytest.raises(ValueError, match="n >= 0"):
        cur.sample(-1)
