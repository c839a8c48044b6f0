"""rng.pt across machines (scalerl/trainer/checkpoint.py): a checkpoint written where 4 CUDA
devices were visible resumes where 1 is, and the CPU, Python and numpy streams continue exactly.

torch.cuda is faked (no GPU here): the fake set_rng_state_all refuses a device index past the
devices present, as CUDA does ("invalid device ordinal"), so restoring every saved state fails.
"""

import json
import random

import numpy as np
import pytest
import torch

from scalerl.trainer.checkpoint import rng_state, set_rng_state


class FakeCuda:
    """torch.cuda's RNG functions for `count` devices, each state a distinct byte tensor."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.set: list[tuple[int, torch.Tensor]] = []  # (device, state) per set call

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", self.get_all)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.set_all)

    def get_all(self) -> list[torch.Tensor]:
        return [torch.full((16,), 10 + d, dtype=torch.uint8) for d in range(self.count)]

    def set_all(self, states) -> None:
        for device, state in enumerate(states):
            if device >= self.count:
                raise RuntimeError(f"CUDA error: invalid device ordinal {device}")
            self.set.append((device, state.clone()))


def _save(tmp_path, monkeypatch, devices: int):
    """rng_state() as write_checkpoint stores it (rng.pt, rng.json) on a `devices` machine."""
    FakeCuda(devices).install(monkeypatch)
    tensors, plain = rng_state()
    torch.save(tensors, tmp_path / "rng.pt")
    (tmp_path / "rng.json").write_text(json.dumps(plain))


def _restore(tmp_path) -> None:
    set_rng_state(
        torch.load(tmp_path / "rng.pt", weights_only=True),
        json.loads((tmp_path / "rng.json").read_text()),
    )


def test_a_4_device_checkpoint_restores_onto_1_device_and_the_host_streams_continue(
    tmp_path, monkeypatch
):
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    _save(tmp_path, monkeypatch, devices=4)
    assert len(torch.load(tmp_path / "rng.pt", weights_only=True)["cuda"]) == 4
    expected = (torch.rand(5), random.random(), np.random.rand(3))  # the next draws after saving

    torch.manual_seed(999)  # the resumed process starts elsewhere in every stream
    random.seed(999)
    np.random.seed(999)
    one = FakeCuda(1)
    one.install(monkeypatch)
    _restore(tmp_path)

    # exactly device 0, with the state device 0 had when saved
    assert [d for d, _ in one.set] == [0]
    assert torch.equal(one.set[0][1], torch.full((16,), 10, dtype=torch.uint8))
    # the CPU, Python and numpy streams continue where the checkpoint left them
    assert torch.equal(torch.rand(5), expected[0])
    assert random.random() == expected[1]
    np.testing.assert_array_equal(np.random.rand(3), expected[2])


def test_a_1_device_checkpoint_on_2_devices_sets_only_the_saved_one(tmp_path, monkeypatch):
    _save(tmp_path, monkeypatch, devices=1)
    two = FakeCuda(2)
    two.install(monkeypatch)
    _restore(tmp_path)
    assert [d for d, _ in two.set] == [0]


@pytest.mark.parametrize("devices", [2, 4])
def test_the_same_device_count_restores_every_state(tmp_path, monkeypatch, devices):
    _save(tmp_path, monkeypatch, devices=devices)
    same = FakeCuda(devices)
    same.install(monkeypatch)
    _restore(tmp_path)
    assert [(d, int(s[0])) for d, s in same.set] == [(d, 10 + d) for d in range(devices)]


def test_a_checkpoint_without_cuda_states_sets_none(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tensors, plain = rng_state()
    assert "cuda" not in tensors
    recorder = FakeCuda(1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", recorder.set_all)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resumed on a GPU machine
    set_rng_state(tensors, plain)
    assert recorder.set == []
