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


def test_a_run_on_cuda_is_refused_before_anything_is_written(tmp_path):
    """runtime/common.py check_placement, which `scalerl run` and prepare_run call first."""
    from runtime.common import check_placement

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


def test_a_run_with_processes_on_another_node_is_refused_before_it_starts(tmp_path):
    from runtime.common import check_placement

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
