"""RunConfig: the paper's defaults, presets, YAML + overrides, and the messages bad input gets."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from scalerl.config import PRESETS, ConfigError, RunConfig, dump_config, load_config
from scalerl.config_docs import render_config_markdown

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_papers_table():
    # ../shared/SCALERL.md section 7, written out here rather than read from the code.
    cfg = RunConfig()
    assert cfg.generation.prompts_per_batch == 48
    assert cfg.generation.samples_per_prompt == 16
    assert cfg.completions_per_batch == 768
    assert cfg.pipeline.max_off_policy_steps == 8
    assert cfg.algorithm.loss.type == "cispo"
    assert cfg.algorithm.loss.eps_max == 4.0
    assert cfg.optimizer.lr == 5e-7
    assert cfg.optimizer.warmup_steps == 100
    assert cfg.optimizer.eps == 1e-15
    assert cfg.optimizer.weight_decay == 0.01
    assert cfg.generation.max_prompt_tokens == 2048
    assert cfg.generation.max_new_tokens == 12288 + 2048
    assert cfg.length_control.answer_budget == 2048
    assert (cfg.length_control.thinking_budget_min, cfg.length_control.thinking_budget_max) == (
        10_000,
        12_000,
    )
    assert cfg.length_control.interruption_phrase == (
        "Okay, time is up. Let me stop thinking and formulate a final answer now. </think>"
    )
    assert cfg.algorithm.pass_rate_threshold == 0.9
    assert cfg.algorithm.aggregation == "prompt"
    assert cfg.algorithm.advantage_normalization == "batch"
    assert cfg.algorithm.zero_variance_filter is True
    assert cfg.algorithm.no_positive_resampling is True
    assert cfg.algorithm.fp32_lm_head is True
    assert cfg.data.num_eval_prompts == 1000
    assert cfg.evaluation.samples_per_prompt == 16
    assert cfg.evaluation.every_steps == 100


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_validates(preset):
    cfg = load_config(preset=preset)
    assert (
        cfg.completions_per_batch
        == cfg.generation.prompts_per_batch * cfg.generation.samples_per_prompt
    )


def test_tiny_cpu_is_small():
    cfg = load_config(preset="tiny-cpu")
    assert cfg.model.name_or_path == "builtin:tiny-warm"
    assert cfg.completions_per_batch <= 128
    assert cfg.generation.max_new_tokens <= 64


def test_yaml_then_overrides_in_that_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"generation": {"samples_per_prompt": 4, "temperature": 0.7}}))
    cfg = load_config(
        path,
        preset="tiny-cpu",
        overrides=["generation.samples_per_prompt=2", "algorithm.loss.eps_max=8"],
    )
    assert cfg.generation.samples_per_prompt == 2  # override beats file
    assert cfg.generation.temperature == 0.7  # file beats preset/default
    assert cfg.generation.prompts_per_batch == 8  # preset beats default
    assert cfg.algorithm.loss.eps_max == 8.0


def test_switching_the_loss_by_type():
    cfg = load_config(overrides=["algorithm.loss={type: dapo, eps_high: 0.26}"])
    assert cfg.algorithm.loss.type == "dapo"
    assert (cfg.algorithm.loss.eps_low, cfg.algorithm.loss.eps_high) == (0.2, 0.26)


def test_the_weights_are_a_variant_per_transport_chosen_by_set():
    """weights.transport picks the variant; --set switches it, and the variant's own fields
    come with it (local_dir only on local, nccl_address only on nccl)."""
    cfg = load_config()
    assert cfg.weights.transport == "store" and "local_dir" not in type(cfg.weights).model_fields
    cfg = load_config(
        preset="tiny-cpu", overrides=["weights.transport=local", "weights.local_dir=/x"]
    )
    assert (cfg.weights.transport, cfg.weights.local_dir, cfg.weights.durable_every) == (
        "local",
        "/x",
        10,
    )
    cfg = load_config(
        overrides=[
            "placement.accelerator=cuda",
            "weights.transport=nccl",
            "weights.nccl_address=10.0.0.1",
            "weights.keep_checkpoints=5",
        ]
    )
    assert (cfg.weights.nccl_address, cfg.weights.keep_checkpoints) == ("10.0.0.1", 5)
    # a YAML section of one transport switched to another by --set
    assert (
        load_config(
            preset="tiny-cpu", overrides=["weights={transport: local}", "weights.transport=store"]
        ).weights
        == load_config(preset="tiny-cpu").weights
    )


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["weights.local_dir=/x"],
            "weights.local_dir exists only with weights.transport=local, not with "
            "weights.transport = 'store'. Fix: set weights.transport=local, or drop "
            "weights.local_dir.",
        ),
        (
            ["weights.transport=local", "weights.nccl_address=10.0.0.1"],
            "weights.nccl_address exists only with weights.transport=nccl, not with "
            "weights.transport = 'local'. Fix: set weights.transport=nccl, or drop "
            "weights.nccl_address.",
        ),
        (
            ["weights.durable_every=3"],
            "weights.durable_every exists only with weights.transport=local or nccl, not with "
            "weights.transport = 'store'. Fix: set weights.transport=local, or drop "
            "weights.durable_every.",
        ),
        (
            ["weights.transport=ftp"],
            "weights.transport = 'ftp' is not a known transport; valid: local, nccl, store",
        ),
        (
            ["weights.transport=local", "weights.keep_checkpoint=2"],
            "unknown key 'weights.keep_checkpoint'; did you mean 'weights.keep_checkpoints'?",
        ),
        (
            ["weights.transport=local", "weights.durable_every=0"],
            "weights.durable_every = 0: Input should be greater than or equal to 1. Fix: set "
            "weights.durable_every within [1, inf).",
        ),
    ],
)
def test_a_field_of_another_transport_gets_one_line(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(preset="tiny-cpu", overrides=overrides)
    assert str(info.value).splitlines()[1:] == [f"  {expected}"]


@pytest.mark.parametrize("transport", ["store", "local", "nccl"])
def test_a_run_json_written_before_the_variants_still_validates(transport):
    """Snapshots from before the union hold every field of every transport, unused ones None
    or at their default: each validates as its transport's variant, the rest dropped."""
    from scalerl.config import validate_config

    saved = RunConfig().model_dump(mode="json")
    saved["placement"]["accelerator"] = "cuda"  # nccl's; harmless for the others
    saved["weights"] = {
        "transport": transport,
        "local_dir": None,
        "durable_every": 10,
        "nccl_address": None,
        "prune": True,
        "keep_evaluated": True,
        "keep_checkpoints": 3,
        "keep_checkpoint_every": None,
    }
    weights = validate_config(saved).weights
    assert weights.transport == transport and weights.keep_checkpoints == 3
    dumped = weights.model_dump()
    assert ("local_dir" in dumped) == (transport == "local")
    assert ("nccl_address" in dumped) == (transport == "nccl")
    assert ("durable_every" in dumped) == (transport != "store")


def test_every_transports_field_has_a_description():
    from scalerl.config import _TRANSPORTS

    for transport, variant in _TRANSPORTS.items():
        for name, info in variant.model_fields.items():
            assert info.description, f"weights.{name} (transport {transport}) has no description"


def test_the_run_config_schema_offers_the_transports_as_a_choice():
    """RunConfig is the flow's parameter: its JSON schema builds, with the weights as anyOf
    (the Prefect UI's form renders it as a choice) and the store's defaults."""
    schema = RunConfig.model_json_schema()
    weights = schema["properties"]["weights"]
    refs = [option["$ref"].rsplit("/", 1)[-1] for option in weights["anyOf"]]
    assert refs == ["StoreWeightsConfig", "LocalWeightsConfig", "NcclWeightsConfig"]
    assert weights["default"]["transport"] == "store"


def test_dump_round_trips(tmp_path):
    cfg = load_config(preset="tiny-cpu", overrides=["algorithm.loss={type: gspo}"])
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["generation.samples_per_promt=8"],
            "unknown key 'generation.samples_per_promt'; did you mean 'generation.samples_per_prompt'?",
        ),
        (
            ["algorithm.loss.eps=0.3"],
            "unknown key 'algorithm.loss.eps'; did you mean 'algorithm.loss.eps_max'?",
        ),
        (["modle.dtype=float32"], "unknown key 'modle'; did you mean 'model'?"),
        (
            ["pipeline.max_off_policy_steps=-1"],
            "pipeline.max_off_policy_steps = -1: Input should be greater than or equal to 0",
        ),
        (
            ["algorithm.loss.eps_max=0"],
            "algorithm.loss.eps_max = 0: Input should be greater than 0",
        ),
        (
            ["algorithm.loss.type=ppo"],
            "algorithm.loss.type = 'ppo' is not a known loss; valid: cispo, dapo, grpo, gspo",
        ),
        (
            ["generation.samples_per_prompt=1"],
            "generation.samples_per_prompt = 1: Input should be greater than or equal to 2",
        ),
        (
            ["generation.completions_per_batch=700"],
            "generation.completions_per_batch = 700 must equal generation.prompts_per_batch x "
            "generation.samples_per_prompt = 48 x 16 = 768",
        ),
        (
            ["length_control.thinking_budget_max=13000"],
            "length_control.thinking_budget_max = 13000 puts the interruption window outside the generation "
            "budget; allowed range [10000, 12288]",
        ),
        (
            ["length_control.thinking_budget_min=12001"],
            "length_control.thinking_budget_min = 12001 is above length_control.thinking_budget_max = 12000",
        ),
        (
            ["algorithm.loss={type: dapo, eps_low: 0.3, eps_high: 0.2}"],
            "algorithm.loss.eps_high = 0.2 is below eps_low = 0.3",
        ),
        (["storage.run_id=../escape"], "storage.run_id = '../escape': String should match pattern"),
        (
            ["algorithm.aggregation=sequence"],
            "algorithm.aggregation = 'sequence': Input should be 'prompt', 'sample' or 'token'",
        ),
    ],
)
def test_bad_values_get_the_documented_message(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("preset", "max_new_tokens", "answer_budget", "window_max"),
    [("tiny-cpu", 1, 4, 8), (None, 1, 2_048, 12_000), ("tiny-cpu", 9, 4, 8)],
)
def test_a_budget_too_small_for_the_window_says_how_far_to_raise_it(
    preset, max_new_tokens, answer_budget, window_max
):
    """Not 'allowed range [1, -3]': the field that must rise, and to at least what."""
    need = answer_budget + window_max
    with pytest.raises(ConfigError) as info:
        load_config(preset=preset, overrides=[f"generation.max_new_tokens={max_new_tokens}"])
    assert str(info.value) == (
        "invalid run configuration:\n  "
        f"generation.max_new_tokens = {max_new_tokens} leaves no room for the interruption "
        f"window: it must be at least length_control.answer_budget {answer_budget} + "
        f"length_control.thinking_budget_max {window_max} = {need}; allowed range "
        f"[{need}, 1048576]. Fix: raise generation.max_new_tokens to at least {need}, lower "
        "length_control.answer_budget and the window (thinking_budget_min/max), or set "
        "length_control.enabled=false."
    )
    fixed = load_config(preset=preset, overrides=[f"generation.max_new_tokens={need}"])
    assert fixed.generation.max_new_tokens == need


def test_a_window_that_can_shrink_into_the_budget_gives_a_non_empty_range():
    # tiny-cpu: window [6, 8], answer budget 4; 10 tokens leave 10 - 4 = 6 for thinking.
    with pytest.raises(ConfigError) as info:
        load_config(preset="tiny-cpu", overrides=["generation.max_new_tokens=10"])
    assert "length_control.thinking_budget_max = 8 puts the interruption window" in str(info.value)
    assert "allowed range [6, 6]" in str(info.value)
    assert "raise generation.max_new_tokens to at least 12." in str(info.value)
    load_config(
        preset="tiny-cpu",
        overrides=["generation.max_new_tokens=10", "length_control.thinking_budget_max=6"],
    )


def test_budgets_above_the_largest_generation_budget_say_to_lower_them():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["length_control.answer_budget=1048576"])
    assert str(info.value).endswith(
        "length_control.answer_budget 1048576 + length_control.thinking_budget_max 12000 = "
        "1060576 is above the largest generation.max_new_tokens, 1048576. Fix: lower them to "
        "1048576 or less in all."
    )


TINY_WARM_REFUSED = (
    "model.name_or_path = 'builtin:tiny-warm' is warm-started on arithmetic, but data.source = "
    "{source!r} with data.task = {task!r}. Fix: use synthetic:arithmetic or a file with "
    "data.task=arithmetic, or 'builtin:tiny'."
)


@pytest.mark.parametrize(
    ("source", "task"),
    [
        ("synthetic:countdown", "auto"),
        ("prompts.jsonl", "auto"),
        ("prompts.parquet", "math"),
        ("prompts.jsonl", "countdown"),
    ],
)
def test_tiny_warm_with_other_data_is_refused_by_the_config(source, task):
    """The rule of runtime/common.py::_warm_tiny_model, checked when the config is validated (so
    `config validate`, `run` and the Prefect form refuse it before run.json is written)."""
    overrides = [f"data.source={source}", f"data.task={task}"]
    with pytest.raises(ConfigError) as info:
        load_config(preset="tiny-cpu", overrides=overrides)
    assert str(info.value) == "invalid run configuration:\n  " + TINY_WARM_REFUSED.format(
        source=source, task=task
    )
    data = load_config(preset="tiny-cpu").model_dump(mode="json")
    data["data"] |= {"source": source, "task": task}
    with pytest.raises(ValueError, match="is warm-started on arithmetic"):
        RunConfig.model_validate(data)  # what the Prefect form's parameters go through


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.source=synthetic:arithmetic"],
        ["data.source=synthetic:arithmetic-easy"],
        ["data.source=prompts.jsonl", "data.task=arithmetic"],
        ["data.source=synthetic:countdown", "model.name_or_path=builtin:tiny"],
    ],
)
def test_tiny_warm_with_arithmetic_data_or_tiny_with_anything_is_valid(overrides):
    load_config(preset="tiny-cpu", overrides=overrides)


def test_bad_files_and_presets(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("generation: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listing)
    with pytest.raises(ConfigError, match="did you mean 'tiny-cpu'"):
        load_config(preset="tiny_cpu")
    with pytest.raises(ConfigError, match="not of the form section.field=value"):
        load_config(overrides=["samples_per_prompt"])


def test_config_docs_are_current():
    committed = (REPO / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    assert committed == render_config_markdown(), (
        "docs/CONFIG.md is stale: run `scalerl config docs -o docs/CONFIG.md`"
    )


def test_every_field_has_a_description():
    def walk(model, prefix=""):
        for name, info in model.model_fields.items():
            assert info.description, f"{prefix}{name} has no description"
            ann = info.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")

    walk(RunConfig)


def test_overrides_never_mutate_the_presets():
    before = repr(PRESETS)
    load_config(
        preset="tiny-cpu", overrides=["generation.samples_per_prompt=3", "evaluation.every_steps=7"]
    )
    assert repr(PRESETS) == before


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:9000", "https://s3.example.com", "http://minio:9000/", "http://[::1]:9000"],
)
def test_endpoints_that_s3_clients_take_are_accepted(url):
    assert RunConfig.model_validate({"storage": {"endpoint_url": url}}).storage.endpoint_url == url


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://127.0.0.1:99999", "a port outside 1-65535"),
        ("http://127.0.0.1:port", "a port outside 1-65535"),
        ("http://127.0.0.1:0", "a port outside 1-65535"),
        ("http://:9000", "no host"),
        ("127.0.0.1:9000", "must start with http:// or https://"),
        ("http://127.0.0.1:9000/bucket", "a path, query string or fragment"),
        (
            "http://127.0.0.1:9000/?X-Amz-Signature=SECRET-VALUE-9",
            "a path, query string or fragment",
        ),
    ],
)
def test_endpoints_botocore_cannot_use_get_one_line_without_the_url(url, says):
    with pytest.raises(ValidationError) as caught:
        RunConfig.model_validate({"storage": {"endpoint_url": url}})
    assert says in str(caught.value) and "SECRET" not in str(caught.value).split("input_value")[0]


def test_evaluation_metrics_name_a_known_kind_and_a_k_within_the_samples():
    sets = [
        {
            "name": "aime",
            "source": "a.jsonl",
            "samples_per_prompt": 8,
            "metrics": ["pass@k", "maj@4"],
        }
    ]
    ev = RunConfig.model_validate({"evaluation": {"sets": sets}}).evaluation
    assert ev.sets[0].metric_ks() == [("pass", 8), ("maj", 4)]
    assert ev.heldout_metric_ks() == [("mean", 16), ("pass", 16)]  # samples_per_prompt 16
    too_many = [{**sets[0], "metrics": ["pass@32"]}]
    with pytest.raises(
        ValidationError,
        match=r"evaluation set 'aime' reports pass@32 but its samples_per_prompt = 8; allowed K range \[1, 8\]",
    ):
        RunConfig.model_validate({"evaluation": {"sets": too_many}})
    with pytest.raises(
        ValidationError,
        match=r"evaluation.heldout_metrics reports maj@20 but evaluation.samples_per_prompt = 16",
    ):
        RunConfig.model_validate({"evaluation": {"heldout_metrics": ["maj@20"]}})
    for bad in (["best@2"], ["pass@0"], ["pass"]):
        with pytest.raises(ValidationError, match="is not one of mean@K, pass@K, maj@K"):
            RunConfig.model_validate({"evaluation": {"heldout_metrics": bad}})
