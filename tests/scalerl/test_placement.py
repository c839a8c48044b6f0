"""scalerl/placement.py: devices per process on simulated inventories, the one-line refusals,
and memory by arithmetic written out here (parameter counts checked against the published
model cards)."""

from __future__ import annotations

import pytest

from scalerl.config import ConfigError, load_config
from scalerl.placement import GIB, VLLM_RESERVE_BYTES, PlacementError, make_plan, model_shape


def cfg(*overrides: str):
    return load_config(overrides=["placement.accelerator=cuda", *overrides])


def visible(plan, name: str) -> str:
    return plan.process(name).env["CUDA_VISIBLE_DEVICES"]


def test_one_node_of_eight():
    plan = make_plan(cfg("placement.trainer_ranks=2", "generation.num_generators=6"))
    default = make_plan(cfg(), model_shape("Qwen/Qwen3-8B"))  # the paper preset: 8B, 4 + 4
    assert visible(default, "trainer@node0") == "0,1,2,3"
    assert [visible(default, f"gen{i}") for i in range(4)] == ["4", "5", "6", "7"]
    assert visible(plan, "trainer@node0") == "0,1"
    assert plan.process("trainer@node0").ranks == (0, 1)
    assert [visible(plan, f"gen{i}") for i in range(6)] == ["2", "3", "4", "5", "6", "7"]
    assert visible(plan, "eval") == "2"  # beside gen0 by default
    assert {p.node for p in plan.processes} == {0}


def test_four_nodes_of_eight_with_tensor_parallel_and_own_evaluation():
    plan = make_plan(
        cfg(
            "placement.nodes=4",
            "placement.trainer_ranks=8",
            "placement.trainer_devices=[0,1,2,3,8,9,10,11]",
            "placement.tensor_parallel=2",
            "placement.evaluation_devices=[4,5]",
            "generation.num_generators=10",
        )
    )
    t0, t1 = plan.process("trainer@node0"), plan.process("trainer@node1")
    assert (t0.env["CUDA_VISIBLE_DEVICES"], t0.ranks) == ("0,1,2,3", (0, 1, 2, 3))
    assert (t1.env["CUDA_VISIBLE_DEVICES"], t1.ranks, t1.node) == ("0,1,2,3", (4, 5, 6, 7), 1)
    assert visible(plan, "eval") == "4,5"
    gens = [plan.process(f"gen{i}") for i in range(10)]
    # node 0: 6,7 (4,5 are the evaluation's); node 1: 12-15; node 2: 16-23; in TP pairs
    assert [(g.node, g.env["CUDA_VISIBLE_DEVICES"]) for g in gens] == [
        (0, "6,7"),
        (1, "4,5"),
        (1, "6,7"),
        (2, "0,1"),
        (2, "2,3"),
        (2, "4,5"),
        (2, "6,7"),
        (3, "0,1"),
        (3, "2,3"),
        (3, "4,5"),
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["placement.trainer_devices=[0]", "placement.generator_devices=[0]"],
            "device 0 (node 0, local 0) is given to both the trainer and generator gen0",
        ),
        (["placement.tensor_parallel=3"], "placement.tensor_parallel = 3 does not divide"),
        (["placement.trainer_devices=[8]"], "names device 8, but placement.nodes x"),
        (
            ["placement.trainer_ranks=3", "placement.trainer_devices=[0,1]"],
            "lists 2 devices for placement.trainer_ranks = 3",
        ),
        (
            ["placement.nodes=2", "placement.trainer_ranks=3", "placement.trainer_devices=[0,1,8]"],
            "torchrun starts the same number of ranks on every machine",
        ),
        (
            ["placement.trainer_ranks=4", "generation.num_generators=5"],
            "5 generators x tensor_parallel 1 need 5 devices",
        ),
        (
            [
                "placement.nodes=2",
                "placement.tensor_parallel=2",
                "placement.generator_devices=[7,8]",
            ],
            "gives gen0 devices [7, 8] on two machines",
        ),
        (
            ["placement.trainer_ranks=2", "pipeline.isolation=thread"],
            "needs one process per rank",
        ),
    ],
)
def test_bad_layouts_get_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        cfg("placement.trainer_ranks=1", "generation.num_generators=1", *overrides)
    assert message in str(err.value) and "Fix:" in str(err.value)


def test_cpu_ignores_devices_but_keeps_the_ranks():
    plan = make_plan(load_config(preset="tiny-cpu", overrides=["placement.trainer_ranks=2"]))
    assert plan.accelerator == "cpu"
    assert plan.process("trainer@node0").ranks == (0, 1)
    assert all(p.env == {} for p in plan.processes)


def _qwen_params(h, inter, layers, heads, kv, d, vocab, tied, qkv_bias, qk_norm):
    attn = h * heads * d + 2 * h * kv * d + heads * d * h
    attn += (heads * d + 2 * kv * d) if qkv_bias else 0
    attn += 2 * d if qk_norm else 0
    layer = attn + 3 * h * inter + 2 * h
    return vocab * h * (1 if tied else 2) + layers * layer + h


@pytest.mark.parametrize(
    ("name", "args", "published"),
    [
        # Qwen2.5-0.5B: 0.49B (model card); Qwen2 has q/k/v biases
        ("Qwen/Qwen2.5-0.5B", (896, 4864, 24, 14, 2, 64, 151936, True, True, False), 494_032_768),
        # Qwen3-8B: 8.2B (model card); Qwen3 has q/k norms, no biases, an untied head
        ("Qwen/Qwen3-8B", (4096, 12288, 36, 32, 8, 128, 151936, False, False, True), 8.2e9),
    ],
)
def test_parameter_counts(name, args, published):
    shape = model_shape(name)
    assert shape.params == _qwen_params(*args)
    assert abs(shape.params - published) / published < 0.005


def test_memory_by_arithmetic_for_qwen3_8b():
    c = cfg()  # 4 trainer ranks, 4 generators
    shape = model_shape("Qwen/Qwen3-8B")
    plan = make_plan(c, shape)
    P = 8_190_735_360
    trainer = plan.process("trainer@node0").memory
    assert trainer["weights fp32 (1/ranks)"] == 4 * P // 4
    assert trainer["AdamW moments fp32 (1/ranks)"] == 8 * P // 4
    # KV per token: K and V x 36 layers x 8 KV heads x 128 x 2 bytes (bf16)
    kv_per_token = 2 * 36 * 8 * 128 * 2
    kv_tokens = int((0.7 * 80 * GIB - 2 * P - VLLM_RESERVE_BYTES) // kv_per_token)
    assert plan.kv_tokens_per_engine == kv_tokens
    seqs = kv_tokens // (2048 + 14336)  # the paper's 2,048 prompt + 14,336 completion tokens
    assert plan.max_num_seqs == seqs < c.generation.max_batch_size
    assert any(f"max_num_seqs = {seqs} (clamped" in w for w in plan.warnings)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["evaluation.gpu_memory_utilization=0.1", "generation.gpu_memory_utilization=0.8"],
            "the evaluation engine beside gen0 (evaluation.gpu_memory_utilization) gets 0.1 of 80",
        ),
        (["generation.gpu_memory_utilization=0.2"], "= 16.0 GiB per device cannot hold"),
        (
            [
                "placement.tensor_parallel=8",
                "placement.trainer_ranks=8",
                "placement.nodes=2",
                "generation.num_generators=1",
            ],
            "",
        ),
        (["placement.trainer_ranks=1", "generation.num_generators=1"], "alone take"),
        (
            [
                "generation.max_new_tokens=1000000",
                "length_control.enabled=false",
                "placement.device_memory_gib=141",
            ],
            "less than one sequence",
        ),
    ],
)
def test_memory_refusals(overrides, message):
    c = cfg(*overrides)
    shape = model_shape("Qwen/Qwen3-8B")
    if not message:  # TP 8 divides 32 heads and 8 KV heads: accepted
        assert make_plan(c, shape).process("gen0").env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
        return
    with pytest.raises(PlacementError) as err:
        make_plan(c, shape)
    assert message in str(err.value) and "Fix:" in str(err.value)


def test_tensor_parallel_must_divide_heads():
    c = cfg("placement.tensor_parallel=4", "generation.num_generators=1")
    with pytest.raises(PlacementError, match="does not divide the model's 14 attention heads"):
        make_plan(c, model_shape("Qwen/Qwen2.5-0.5B"))


def test_colocate_puts_everything_on_one_gpu():
    c = cfg(
        "placement.devices_per_node=1",
        "placement.trainer_ranks=1",
        "generation.num_generators=1",
        "placement.colocate=true",
        "generation.gpu_memory_utilization=0.35",
        "evaluation.gpu_memory_utilization=0.1",
    )
    plan = make_plan(c, model_shape("Qwen/Qwen2.5-0.5B"))
    assert {p.env["CUDA_VISIBLE_DEVICES"] for p in plan.processes} == {"0"}
    assert not any("colocate" in w for w in plan.warnings)  # 0.5B trains in the 55% left
    with pytest.raises(ConfigError, match="or set placement.colocate=true"):
        cfg(
            "placement.devices_per_node=1",
            "placement.trainer_ranks=1",
            "generation.num_generators=1",
        )


def fake_gpus(monkeypatch, count: int, visible: str | None = None) -> None:
    """This machine shows `count` GPUs (nvidia-smi, faked) and the given CUDA_VISIBLE_DEVICES."""
    import scalerl.placement

    monkeypatch.setattr(scalerl.placement, "gpu_count", lambda: count)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)


def test_a_run_on_cuda_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """runtime/common.py check_placement, which `scalerl run` and prepare_run call first."""
    from runtime.common import check_placement

    fake_gpus(monkeypatch, 8)

    bad = cfg(
        f"storage.url={tmp_path}",
        "evaluation.gpu_memory_utilization=0.1",
        "generation.gpu_memory_utilization=0.8",
    )
    with pytest.raises(PlacementError, match="cannot hold Qwen/Qwen3-8B's weights"):
        check_placement(bad)
    check_placement(cfg(f"storage.url={tmp_path}"))  # the paper preset's plan holds
    cpu = load_config(preset="tiny-cpu", overrides=[f"storage.url={tmp_path}"])
    check_placement(cpu)  # nothing to check on cpu
    assert list(tmp_path.iterdir()) == []


def test_a_run_with_processes_on_another_node_is_refused_before_it_starts(tmp_path, monkeypatch):
    from runtime.common import check_placement

    fake_gpus(monkeypatch, 8)

    two_nodes = cfg(
        f"storage.url={tmp_path}",
        "placement.nodes=2",
        "placement.trainer_ranks=8",
        "generation.num_generators=2",
    )
    assert make_plan(two_nodes).process("gen0").node == 1
    with pytest.raises(PlacementError, match="gen0 is placed on node 1, and this flow starts"):
        check_placement(two_nodes)
    assert list(tmp_path.iterdir()) == []


# -- the devices the run was given: CUDA_VISIBLE_DEVICES composed, the inventory checked -------


def test_children_take_the_parents_devices_by_position(monkeypatch):
    """Local device i of node 0 is the i-th entry of the flow process's CUDA_VISIBLE_DEVICES
    (indices or UUIDs, as written), not the machine's device i."""
    from runtime.common import process_env

    given = ["4", "5", "6", "7", "GPU-a", "GPU-b", "GPU-c", "GPU-d"]
    plan = make_plan(cfg(), visible=given)  # the paper preset: trainer 0-3, gen0-3 on 4-7
    assert visible(plan, "trainer@node0") == "4,5,6,7"
    assert [visible(plan, f"gen{i}") for i in range(4)] == ["GPU-a", "GPU-b", "GPU-c", "GPU-d"]
    assert visible(plan, "eval") == "GPU-a"  # beside gen0
    assert plan.process("gen0").devices == (4,)  # the plan keeps node-local indices
    fake_gpus(monkeypatch, 8, " 8, 9,10,11,12,13,14,15 ")  # as a scheduler may write it
    assert process_env(cfg(), "trainer@node0") == {"CUDA_VISIBLE_DEVICES": "8,9,10,11"}
    assert process_env(cfg(), "gen3") == {"CUDA_VISIBLE_DEVICES": "15"}
    fake_gpus(monkeypatch, 8)  # unset: the machine's own numbering, as before
    assert process_env(cfg(), "gen3") == {"CUDA_VISIBLE_DEVICES": "7"}


def test_other_nodes_keep_their_local_indices():
    two = cfg("placement.nodes=2", "placement.trainer_ranks=8", "generation.num_generators=2")
    plan = make_plan(two, visible=[str(d) for d in range(10, 18)])
    assert visible(plan, "trainer@node0") == "10,11,12,13,14,15,16,17"
    assert plan.process("gen0").node == 1 and visible(plan, "gen0") == "0"  # not this machine's


def test_a_parent_list_shorter_than_devices_per_node_is_refused_with_one_line(monkeypatch):
    from runtime.common import process_env

    fake_gpus(monkeypatch, 8, "4,5")
    with pytest.raises(PlacementError) as err:
        process_env(cfg(), "gen0")  # without the check: gen0 would get the list's 5th entry
    message = str(err.value)
    assert message.startswith(
        "CUDA_VISIBLE_DEVICES=4,5 gives this machine 2 device(s), but "
        "placement.devices_per_node = 8"
    )
    assert "Fix: set placement.devices_per_node=2" in message and "\n" not in message
    with pytest.raises(PlacementError, match="^CUDA_VISIBLE_DEVICES=4,5 gives this machine"):
        make_plan(cfg(), visible=["4", "5"])
    make_plan(load_config(preset="tiny-cpu"), visible=["4"])  # cpu: no devices to compose


@pytest.mark.parametrize(
    ("gpus", "visible_devices", "message"),
    [
        (1, None, "placement.devices_per_node = 8, but this machine shows 1 GPU(s) (nvidia-smi"),
        (0, None, "placement.accelerator = 'cuda', but this machine shows no GPU"),
        (8, "3", "CUDA_VISIBLE_DEVICES=3 gives this machine 1 device(s)"),  # the list decides
        (8, "", "CUDA_VISIBLE_DEVICES is set and empty: this process sees no device"),
        (8, None, None),
        (1, "0,1,2,3,4,5,6,7,8", None),  # a list at least devices_per_node long: trusted
    ],
)
def test_scalerl_run_checks_the_inventory_it_sees(
    tmp_path, monkeypatch, gpus, visible_devices, message
):
    """check_placement (`scalerl run`, prepare_run) before anything is written: the default
    devices_per_node 8 on a one-GPU box would give gen0 CUDA_VISIBLE_DEVICES=4."""
    from runtime.common import check_placement

    fake_gpus(monkeypatch, gpus, visible_devices)
    run = cfg(f"storage.url={tmp_path}")
    if message is None:
        check_placement(run)
    else:
        with pytest.raises(PlacementError) as err:
            check_placement(run)
        assert str(err.value).startswith(message) and "Fix:" in str(err.value)
        assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_one_gpu_with_devices_per_node_1_passes_the_inventory_check(tmp_path, monkeypatch):
    from runtime.common import check_placement

    fake_gpus(monkeypatch, 1)
    check_placement(
        cfg(
            f"storage.url={tmp_path}",
            "model.name_or_path=Qwen/Qwen2.5-0.5B",
            "placement.devices_per_node=1",
            "placement.trainer_ranks=1",
            "generation.num_generators=1",
            "placement.colocate=true",
            "generation.gpu_memory_utilization=0.35",
            "evaluation.gpu_memory_utilization=0.1",
        )
    )


def test_gpu_count_reads_nvidia_smi(monkeypatch):
    """The project's own detection (no torch, no CUDA initialised): GPU lines, not MIG lines."""
    import subprocess

    import scalerl.placement as placement

    listing = (
        "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\n"
        "  MIG 3g.40gb     Device  0: (UUID: MIG-1)\n"
        "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)\n"
    )
    monkeypatch.setattr(placement.shutil, "which", lambda _name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(
        placement.subprocess,
        "run",
        lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=listing, stderr=""),
    )
    assert placement.gpu_count() == 2
    monkeypatch.setattr(placement.shutil, "which", lambda _name: None)
    assert placement.gpu_count() == 0


def test_a_lora_trainer_of_qwen3_8b_fits_one_gpu_that_full_weights_do_not():
    """model.lora: the trainer holds the base frozen in bf16 (2 bytes a parameter) and the
    adapters in fp32 with gradients and AdamW moments (16 bytes each); r = 32 on the 7
    projections of Qwen3-8B (36 layers, hidden 4096, 32 x 128 query and 8 x 128 KV, MLP 12288)
    is 32 x 36 x (2 x (4096 + 4096) + 2 x (4096 + 1024) + 3 x (4096 + 12288)) parameters."""
    shape = model_shape("Qwen/Qwen3-8B")
    one = ["placement.trainer_ranks=1", "placement.devices_per_node=2", "placement.nodes=1"]
    one += ["generation.num_generators=1", "placement.evaluation_devices=null"]
    with pytest.raises(PlacementError, match="raise placement.trainer_ranks to at least 2"):
        make_plan(cfg(*one), shape)
    plan = make_plan(cfg(*one, "model.lora.rank=32"), shape)
    adapter = 32 * 36 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 12288))
    trainer = plan.process("trainer@node0").memory
    assert trainer["base weights, frozen (model.dtype)"] == 8_190_735_360 * 2
    assert trainer["adapter weights, gradients, AdamW moments fp32"] == 16 * adapter
    assert sum(trainer.values()) < 80 * GIB
