"""Run configuration: one pydantic model per component, the paper's defaults, presets.

    from scalerl.config import load_config
    cfg = load_config("my.yaml", preset="tiny-cpu", overrides=["generation.samples_per_prompt=8"])

Defaults are the paper's (Khatri et al. 2025, "The Art of Scaling RL Compute for LLMs", sec. 7 of
../shared/SCALERL.md): 48 prompts x 16 samples, k = 8, CISPO with eps_max = 4, AdamW lr 5e-7 with
a 100-step warmup and eps 1e-15, 12,288 thinking + 2,048 answer + 2,048 prompt tokens, interruption
drawn in [10k, 12k], No-Positive-Resampling at pass rate 0.9, FP32 LM head, evaluation on 1,000
held-out prompts every 100 steps.

Every field carries its bounds and a one-line description (shown in the Prefect UI run form and in
docs/CONFIG.md). Unknown keys are rejected with the closest valid name; cross-field checks name the
field path, the value and the allowed range. Credentials never live here: S3 keys come from the
usual AWS_* environment variables, so run.json can be shared safely.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """An invalid configuration; the message names the field, the value and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# The attention and MLP projections of the Qwen and Llama families (the same names in
# transformers and vLLM): where LoRA adapters go by default.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraConfig(_Section):
    """Low-rank adapters trained in place of the full weights (scalerl/lora.py). The LM head is
    never adapted or trained: it stays the base model's, frozen, and keeps its FP32 matmul in
    trainer and generator (algorithm.fp32_lm_head), so the head computes exactly what it
    computes in a full-weight run; adapting it would make every published version carry a
    vocabulary-sized tensor and vLLM would need its LoRA-extended vocabulary path."""

    rank: int = Field(
        32, ge=1, le=512, description="Rank r of every adapter (vLLM serves ranks up to 512)."
    )
    alpha: float = Field(
        64.0, gt=0, description="LoRA alpha: the adapter's update is scaled by alpha / rank."
    )
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout on the adapter's input while training; 0 keeps the trainer's logprobs the generator's (the importance ratios of CISPO compare the two).",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_TARGETS),
        min_length=1,
        description="Names of the linear modules that get adapters (module names or name suffixes, as peft matches them); the default fits Qwen and Llama attention and MLP projections.",
    )
    trained_modules: list[str] = Field(
        default_factory=list,
        description="Modules trained in full beside the adapters (peft's modules_to_save: module names or name suffixes, e.g. 'norm' for every RMSNorm); published in each version with the adapter. Not the LM head or the embedding (tied to it), not an adapted module; transformers engine only (vLLM serves adapters without them).",
    )
    max_loras: int = Field(
        1,
        ge=1,
        le=8,
        description="vLLM's max_loras: adapter slots on the generator's device. One is enough: each new version replaces the adapter in place.",
    )

    @field_validator("rank", mode="before")
    @classmethod
    def _rank(cls, v):
        if isinstance(v, int) and not isinstance(v, bool) and not 1 <= v <= 512:
            raise ValueError(
                f"model.lora.rank = {v} is out of range: an adapter has rank 1 to 512. Fix: "
                "set model.lora.rank to a positive rank such as 8, 16 or 32, or remove "
                "model.lora to train the full weights."
            )
        return v

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        if "lm_head" in v:
            raise ValueError(
                "model.lora.target_modules holds 'lm_head': the LM head stays the base model's, "
                "frozen, in FP32 (see model.lora). Fix: leave lm_head out."
            )
        return v

    @field_validator("trained_modules")
    @classmethod
    def _trained(cls, v: list[str]) -> list[str]:
        frozen = [m for m in v if m.endswith(("lm_head", "embed_tokens"))]
        if frozen:
            raise ValueError(
                f"model.lora.trained_modules holds {frozen[0]!r}: the LM head and the embedding "
                "(often tied to it) stay the base model's, frozen, in FP32 (see model.lora). "
                "Fix: leave them out."
            )
        return v

    @model_validator(mode="after")
    def _apart(self):
        both = sorted(set(self.trained_modules) & set(self.target_modules))
        if both:
            raise ValueError(
                f"model.lora names {both[0]!r} both in target_modules and trained_modules: a "
                "module gets an adapter or is trained in full, not both. Fix: keep it in one."
            )
        return self


class ModelConfig(_Section):
    name_or_path: str = Field(
        "Qwen/Qwen3-8B",
        min_length=1,
        description="Hugging Face hub id or local directory of the policy to train ('builtin:tiny' builds a tiny local model with random weights, 'builtin:tiny-warm' the same model warm-started on 1-2 digit additions and subtractions).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="Parameter dtype of the model body in generator and trainer."
    )
    revision: str | None = Field(
        None, description="Hub revision (branch, tag or commit) when name_or_path is a hub id."
    )
    gradient_checkpointing: bool = Field(
        True,
        description="Recompute activations in the backward pass to save trainer memory (on in the paper preset: 32k-token micro-batches at 8B need far more than 80 GB of activations otherwise).",
    )
    lora: LoraConfig | None = Field(
        None,
        description="Train LoRA adapters instead of the full weights (unset: full weights). Each published version is then the adapter alone; the generators keep the base model and swap adapters in flight.",
    )


class DataConfig(_Section):
    source: str = Field(
        "synthetic:arithmetic",
        min_length=1,
        description="'synthetic:arithmetic', 'synthetic:arithmetic-easy' (1-2 digit a+b, a-b), 'synthetic:countdown', a .parquet/.jsonl file with prompt and answer columns, 'hf:NAME' (a Hugging Face hub dataset, read through `datasets` with data.subset / data.split / data.revision; HF_DATASETS_OFFLINE and the local cache are honoured), or a folder written by datasets' save_to_disk.",
    )
    task: Literal["auto", "math", "arithmetic", "countdown"] = Field(
        "auto",
        description="Verifier used for rewards; 'auto' takes the synthetic task's own verifier, or 'math' for files.",
    )
    prompt_column: str = Field(
        "prompt",
        min_length=1,
        description="Column holding the prompt text (a dotted path reads a struct field, e.g. extra.question).",
    )
    answer_column: str = Field(
        "answer",
        min_length=1,
        description="Column holding the reference answer (a dotted path reads a struct field, e.g. reward_model.ground_truth).",
    )
    id_column: str | None = Field(
        None, description="Column with unique prompt ids; row numbers are used when unset."
    )
    num_train_prompts: int = Field(
        20_000,
        ge=1,
        le=10_000_000,
        description="Training prompts generated for synthetic sources (files use all rows not held out).",
    )
    num_eval_prompts: int = Field(
        1_000,
        ge=0,
        le=1_000_000,
        description="Held-out prompts for validation, the evaluation set named 'heldout' (the paper uses 1,000); 0 only with evaluation.sets, which then hold every evaluation.",
    )
    seed: int = Field(0, ge=0, description="Seed for synthetic prompts and the train/eval split.")
    subset: str | None = Field(
        None,
        description="Configuration (subset) name of an hf: dataset, as in datasets.load_dataset(name, subset).",
    )
    split: str = Field(
        "train",
        min_length=1,
        description="Split of an hf: dataset or of a save_to_disk folder holding a DatasetDict.",
    )
    revision: str | None = Field(
        None, description="Hub revision (branch, tag or commit) of an hf: dataset."
    )
    messages_column: str | None = Field(
        None,
        description="Column holding a chat (a list of {role, content}) to render instead of prompt_column; the last user turn is the prompt shown in reports.",
    )
    chat_template: str = Field(
        "auto",
        min_length=1,
        description="'auto': render prompts with the tokenizer's chat template when it has one (else raw text, e.g. the builtin tiny model); 'none': raw text; or a path to a Jinja template file.",
    )
    system_prompt: str | None = Field(
        None,
        description="System message put before every prompt when a chat template renders it (not with chat_template = none).",
    )
    enable_thinking: bool | None = Field(
        None,
        description="Passed to chat templates that take it (Qwen3: true opens <think>, false renders an empty thinking block); unset: the template's default.",
    )


class GenerationConfig(_Section):
    engine: Literal["vllm", "vllm-async", "transformers"] = Field(
        "vllm",
        description="Inference engine: vLLM for real runs ('vllm': the step-driven in-process engine; 'vllm-async': vLLM's AsyncLLM, engine core in its own process with async scheduling, scalerl/engines/vllm_async.py), transformers as the CPU fallback.",
    )
    prompts_per_batch: int = Field(
        48, ge=1, le=100_000, description="Prompts in one trainer batch (paper: 48)."
    )
    samples_per_prompt: int = Field(
        16,
        ge=2,
        le=1_024,
        description="Completions G per prompt; at least 2 so a group has a variance (paper: 16).",
    )
    completions_per_batch: int | None = Field(
        None,
        ge=2,
        description="Optional cross-check: must equal prompts_per_batch x samples_per_prompt (paper: 768).",
    )
    temperature: float = Field(
        1.0, gt=0.0, le=10.0, description="Sampling temperature of the generators."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
    max_prompt_tokens: int = Field(
        2_048,
        ge=1,
        le=1_048_576,
        description="Prompt length budget; longer prompts finish with reason 'length' (paper: 2,048).",
    )
    max_new_tokens: int = Field(
        14_336,
        ge=1,
        le=1_048_576,
        description="Completion budget, thinking plus answer (paper: 12,288 + 2,048).",
    )
    num_generators: int = Field(
        4,
        ge=1,
        le=1_024,
        description="Generator workers launched by the run flow, each with its own engine (placement: tensor_parallel devices each).",
    )
    max_batch_size: int = Field(
        256, ge=1, le=65_536, description="Sequences decoded concurrently by one engine."
    )
    gpu_memory_utilization: float = Field(
        0.7,
        gt=0.0,
        le=1.0,
        description="Share of accelerator memory vLLM may take (0.7 leaves evaluation's 0.25 beside it; `scalerl plan` shows what it holds).",
    )
    seed: int = Field(
        0, ge=0, description="Base sampling seed; every sample's seed is derived from it."
    )


_MAX_NEW_TOKENS = next(
    m.le for m in GenerationConfig.model_fields["max_new_tokens"].metadata if hasattr(m, "le")
)


class LengthControlConfig(_Section):
    enabled: bool = Field(
        True,
        description="Interruption-based length control (paper sec. 4); off means plain truncation at max_new_tokens.",
    )
    thinking_budget_min: int = Field(
        10_000,
        ge=1,
        description="Lower end of the window the interruption point is drawn from (paper: 10k).",
    )
    thinking_budget_max: int = Field(
        12_000, ge=1, description="Upper end of the interruption window (paper: 12k)."
    )
    answer_budget: int = Field(
        2_048,
        ge=1,
        description="Tokens allowed after an interruption for the final answer (paper: 2,048).",
    )
    interruption_phrase: str = Field(
        "Okay, time is up. Let me stop thinking and formulate a final answer now. </think>",
        min_length=1,
        description="Text appended when the thinking budget runs out.",
    )
    think_end: str = Field(
        "</think>", min_length=1, description="Marker that closes the reasoning section."
    )


class CISPOLoss(_Section):
    type: Literal["cispo"] = Field(
        "cispo", description="CISPO: truncated importance sampling REINFORCE (the ScaleRL loss)."
    )
    eps_max: float = Field(
        4.0,
        gt=0.0,
        le=1_000.0,
        description="Upper cap on the stop-gradient importance ratio (paper: 4; 4, 5, 8 behave alike).",
    )


class GRPOLoss(_Section):
    type: Literal["grpo"] = Field("grpo", description="GRPO: PPO clipped surrogate (baseline).")
    eps: float = Field(0.2, gt=0.0, lt=1.0, description="Symmetric clip range of the ratio.")


class DAPOLoss(_Section):
    type: Literal["dapo"] = Field(
        "dapo", description="DAPO: asymmetric clip-higher surrogate (baseline)."
    )
    eps_low: float = Field(0.2, gt=0.0, lt=1.0, description="Lower clip range.")
    eps_high: float = Field(
        0.28, gt=0.0, le=10.0, description="Upper clip range (DAPO: 0.26 to 0.28)."
    )


class GSPOLoss(_Section):
    type: Literal["gspo"] = Field(
        "gspo", description="GSPO: sequence-level geometric-mean ratio (baseline)."
    )
    eps_low: float = Field(
        3e-4, gt=0.0, lt=1.0, description="Lower clip range of the sequence ratio."
    )
    eps_high: float = Field(
        4e-4, gt=0.0, le=1.0, description="Upper clip range of the sequence ratio."
    )


LossConfig = Annotated[CISPOLoss | GRPOLoss | DAPOLoss | GSPOLoss, Field(discriminator="type")]


def _choice_for_forms(schema: dict, default: type[BaseModel]) -> None:
    """A discriminated union (the loss, the weights) as `anyOf` with a default, not pydantic's
    `oneOf` + discriminator: the Prefect UI's form renders anyOf as a choice of the variants
    with each one's fields, while a oneOf property showed a bare, empty JSON editor. Validation
    is pydantic's discriminated union either way (the tag constants tell the variants apart)."""
    if "oneOf" in schema:
        schema["anyOf"] = schema.pop("oneOf")
        schema.pop("discriminator", None)
    schema.setdefault("default", default().model_dump())


class AlgorithmConfig(_Section):
    loss: LossConfig = Field(
        default_factory=CISPOLoss,
        description="Policy-gradient loss, chosen by its 'type': cispo (ScaleRL), grpo, dapo or gspo; each has its own clipping fields.",
        json_schema_extra=lambda schema: _choice_for_forms(schema, CISPOLoss),
    )
    aggregation: Literal["prompt", "sample", "token"] = Field(
        "prompt",
        description="Loss aggregation: prompt-level average (ScaleRL), sample average (GRPO), token average (DAPO).",
    )
    advantage_normalization: Literal["batch", "group", "none"] = Field(
        "batch",
        description="Divide group-centered advantages by the batch std (ScaleRL), the group std, or nothing.",
    )
    zero_variance_filter: bool = Field(
        True, description="Drop groups whose rewards are all equal (no replacement sampling)."
    )
    no_positive_resampling: bool = Field(
        True, description="Retire prompts whose pass rate reaches pass_rate_threshold."
    )
    pass_rate_threshold: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="Pass rate at which a prompt is retired from later epochs (paper: 0.9).",
    )
    fp32_lm_head: bool = Field(
        True,
        description="Compute the LM head and log-softmax in float32 in generator and trainer (paper sec. 3.3).",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_loss_type(cls, data: Any) -> Any:
        # `algorithm.loss.eps_max=5` alone should tune the default loss, not fail on a missing tag.
        if (
            isinstance(data, dict)
            and isinstance(data.get("loss"), dict)
            and "type" not in data["loss"]
        ):
            data = {**data, "loss": {"type": "cispo", **data["loss"]}}
        return data


class PipelineConfig(_Section):
    max_off_policy_steps: int = Field(
        8,
        ge=0,
        le=1_024,
        description="PipelineRL k: a completion with any token from policy version v_old is trained at step v only if v - v_old <= k; the trainer waits rather than run more than k steps ahead. 0 = synchronous on-policy.",
    )
    max_queued_batches: int | None = Field(
        None,
        ge=1,
        le=1_024,
        description="At most this many batches waiting for the trainer (committed and unread, plus in generation, over all generators) before a generator holds. None: bounded by k alone. Where generation keeps up with training, a queue bounded by k alone fills up and every batch is trained about k versions stale; a short queue keeps generation and training overlapped (the trainer never waits while one is queued) at a staleness near its length. k stays the hard bound.",
    )
    isolation: Literal["process", "thread"] = Field(
        "process",
        description="Where generators and the trainer run: 'process' (each in its own Python process, supervised by its Prefect task, so they do not share one interpreter lock) or 'thread' (threads of the flow process). A memory:// store always uses threads.",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=1_024,
        description="torch intra-op threads in each generator and trainer process (None: torch's default, all cores). Set 1 on small CPU machines, where the processes would otherwise oversubscribe the cores.",
    )
    stage_tasks: Literal["per_stage", "per_shard", "stream"] = Field(
        "per_stage",
        description="Prefect task runs per rollout shard: 'per_stage' (score-shard, update-curriculum and filter-shard, three task runs) or 'per_shard' (one advance-shard task run that runs the same three stages in order, each still committing its own output), or 'stream' (one persistent advance-stream task run for the whole run, beside the generators and the trainer, that runs the same stages on every shard as it lands; no task run per shard). per_shard costs a third of per_stage's orchestration and stream none per shard: use them when a task run costs as much as generating a shard (tiny models).",
    )


class OptimizerConfig(_Section):
    lr: float = Field(
        5e-7,
        gt=0.0,
        le=1.0,
        description="AdamW learning rate, constant after warmup (paper: 5e-7).",
    )
    warmup_steps: int = Field(
        100, ge=0, le=1_000_000, description="Linear warmup steps (paper: 100)."
    )
    eps: float = Field(1e-15, gt=0.0, le=1e-3, description="AdamW epsilon (paper: 1e-15).")
    weight_decay: float = Field(
        0.01, ge=0.0, le=1.0, description="AdamW weight decay (paper: 0.01)."
    )
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping by global norm.")


class TrainerConfig(_Section):
    micro_batch_tokens: int = Field(
        32_768,
        ge=1,
        description="Token budget of one micro-batch; gradients accumulate over micro-batches.",
    )
    checkpoint_every: int = Field(
        50, ge=1, description="Trainer steps between checkpoints (one is also written at shutdown)."
    )
    max_nan_steps: int = Field(
        3, ge=0, description="Steps with a non-finite loss that are skipped before the run stops."
    )
    publish_in_background: bool = Field(
        True,
        description="Publish each new weight version from a background thread while the next step trains: every version is still published, in order, and a checkpoint waits for the versions before it; the trainer waits only when a second version is ready before the first is committed (or a publish failed).",
    )
    stall_batches: int = Field(
        200,
        ge=0,
        description="Stop the run (state 'stalled', with the reason) after this many batches in a row made no trainer step because every group's rewards were equal: e.g. every reward 0 because the scorer cannot read the answers, or every prompt solved. 0: never.",
    )
    seed: int = Field(0, ge=0, description="Trainer seed (data order ties, dropout).")
    collective_timeout_s: float = Field(
        3600.0,
        ge=60,
        le=86_400,
        description="With several trainer ranks (placement.trainer_ranks > 1): how long a rank may wait in a collective (NCCL or gloo) before the run fails. Rank 0 alone downloads the checkpoint to resume and uploads checkpoints while the other ranks wait in one, which at 8B over S3 (~131 GB of float32 weights and AdamW moments) can take longer than torch's default 10 minutes; raise it for bigger models or slower stores, lower it to see a hung rank sooner.",
    )


class _WeightsBase(_Section):
    """What every weight transport has: its name and retention (runtime/retention.py)."""

    # declared here so that it comes first in every variant; each variant fixes its value
    transport: str = Field(description="How each new policy version reaches the generators.")
    prune: bool = Field(
        True,
        description="Delete old weight versions and checkpoints from the run store while the run goes (off the trainer's step): weight versions older than latest - k - 1 that no generator or evaluation holds, except those weights.keep_evaluated keeps; checkpoints beyond weights.keep_checkpoints and weights.keep_checkpoint_every. False: keep everything (scalerl runs prune RUN frees it later).",
    )
    keep_evaluated: bool = Field(
        True,
        description="Keep every evaluated weight version (a multiple of evaluation.every_steps) in the store for good.",
    )
    keep_checkpoints: int = Field(
        3, ge=1, le=10_000, description="Keep the newest this many checkpoints."
    )
    keep_checkpoint_every: int | None = Field(
        None,
        ge=1,
        description="Also keep, for good, every checkpoint whose step is a multiple of this. None: only the newest weights.keep_checkpoints.",
    )


class _BesideStore(_WeightsBase):
    """Transports that carry every version beside the store, which receives the durable ones."""

    durable_every: int = Field(
        10,
        ge=1,
        description="Also publish every this many versions to the run store (version 0, evaluation versions and checkpoint versions always are).",
    )


class StoreWeightsConfig(_WeightsBase):
    transport: Literal["store"] = Field(
        "store",
        description="'store': every version goes through the run store (durable, works across machines and clouds; every generator downloads every version).",
    )


class LocalWeightsConfig(_BesideStore):
    transport: Literal["local"] = Field(
        "local",
        description="'local' (one node): the trainer writes each version once into a node-local directory, weights.local_dir, and engines reload from there: no upload, no download, no hash. The store still receives a durable copy every weights.durable_every versions, at every evaluation version and at every checkpoint.",
    )
    local_dir: str | None = Field(
        None,
        description="The node-local directory versions are written to (one subdirectory per run). None: /dev/shm/scalerl when /dev/shm exists, else the system temp directory.",
    )


class NcclWeightsConfig(_BesideStore):
    transport: Literal["nccl"] = Field(
        "nccl",
        description="'nccl' (GPU only): vLLM's NCCL weight-transfer engine, trainer rank 0 to every engine. The store still receives a durable copy every weights.durable_every versions, at every evaluation version and at every checkpoint.",
    )
    nccl_address: str | None = Field(
        None,
        description="The trainer's address the generators' NCCL group connects to. None: the address this host's name resolves to (refused when that is loopback and a generator runs on another machine).",
    )


_TRANSPORTS: dict[str, type[_WeightsBase]] = {
    "store": StoreWeightsConfig,
    "local": LocalWeightsConfig,
    "nccl": NcclWeightsConfig,
}
WeightsConfig = Annotated[
    StoreWeightsConfig | LocalWeightsConfig | NcclWeightsConfig, Field(discriminator="transport")
]


def _weights_variant(data: Any) -> Any:
    """The `weights` section as its transport's variant takes it: transport store when none is
    named; a field of another transport that holds None or its default is dropped (run.json
    snapshots written before the variants hold every field of every transport); any other
    value of such a field is refused with one line naming the transport it belongs to."""
    if not isinstance(data, dict):
        return data
    transport = data.get("transport", "store")
    variant = _TRANSPORTS.get(transport) if isinstance(transport, str) else None
    if variant is None:
        return data  # pydantic names the known transports
    out = {}
    for key, value in data.items():
        owners = [t for t, m in _TRANSPORTS.items() if key in m.model_fields]
        if key in variant.model_fields or not owners:  # a typo: pydantic suggests a key
            out[key] = value
        elif value is not None and value != _TRANSPORTS[owners[0]].model_fields[key].default:
            raise ValueError(
                f"weights.{key} exists only with weights.transport={' or '.join(owners)}, not "
                f"with weights.transport = {transport!r}. Fix: set weights.transport={owners[0]}, "
                f"or drop weights.{key}."
            )
    return {**out, "transport": transport}


def upgrade_snapshot(saved: dict) -> dict:
    """A run's run.json as this version's config reads it. Snapshots written before the weights
    section had one variant per transport hold every transport's fields; those of other
    transports never had an effect and are dropped whatever their value (the validator refuses
    them in a new config unless they hold None or their default)."""
    weights = saved.get("weights")
    if not isinstance(weights, dict):
        return saved
    variant = _TRANSPORTS.get(weights.get("transport", "store"))
    if variant is None:
        return saved
    kept = {k: v for k, v in weights.items() if k in variant.model_fields or k not in _ANY_WEIGHTS}
    return {**saved, "weights": kept}


_ANY_WEIGHTS = {name for m in _TRANSPORTS.values() for name in m.model_fields}


HELDOUT_SET = "heldout"
_EVAL_METRIC_RE = re.compile(r"^(mean|pass|maj)@(k|[1-9][0-9]*)$")


def _check_metric_names(value: list[str]) -> list[str]:
    for m in value:
        if not _EVAL_METRIC_RE.match(m):
            raise ValueError(
                f"evaluation metric {m!r} is not one of mean@K, pass@K, maj@K. Fix: write "
                "e.g. 'pass@8', or 'pass@k' for K = samples_per_prompt."
            )
    return value


def _metric_ks(metrics: list[str], samples: int, where: str, field: str) -> list[tuple[str, int]]:
    """(kind, K) per metric, the letter k resolved to `samples`; ValueError (one line) when a K
    is above the samples drawn per prompt."""
    out = []
    for m in metrics:
        kind, k = m.split("@")
        k = samples if k == "k" else int(k)
        if k > samples:
            raise ValueError(
                f"{where} reports {m} but {field} = {samples}; allowed K range [1, {samples}]. "
                f"Fix: raise {field} to {k} or lower K."
            )
        out.append((kind, k))
    return out


class EvalSetConfig(_Section):
    """One named evaluation set: prompts from a source like data.source, k samples each."""

    name: str = Field(
        ...,
        pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$",
        description="Name of the set in eval rows, metrics and reports (lowercase letters, digits, '_', '.', '-').",
    )
    source: str = Field(
        ...,
        min_length=1,
        description="Where its prompts come from: a .parquet/.jsonl file, 'hf:NAME' or a save_to_disk folder (as data.source).",
    )
    subset: str | None = Field(None, description="Configuration (subset) of an hf: dataset.")
    split: str = Field(
        "test", min_length=1, description="Split of an hf: dataset or DatasetDict folder."
    )
    revision: str | None = Field(None, description="Hub revision of an hf: dataset.")
    prompt_column: str = Field(
        "prompt", min_length=1, description="Column holding the prompt text."
    )
    answer_column: str = Field(
        "answer", min_length=1, description="Column holding the reference answer."
    )
    id_column: str | None = Field(
        None, description="Column with unique prompt ids; row numbers when unset."
    )
    messages_column: str | None = Field(
        None,
        description="Column holding a chat (a list of {role, content}) instead of prompt_column.",
    )
    task: Literal["auto", "math", "arithmetic", "countdown"] = Field(
        "auto", description="Verifier; 'auto' takes data.task's verifier (math for files)."
    )
    max_prompts: int | None = Field(
        None, ge=1, le=1_000_000, description="Use only the first this many prompts (unset: all)."
    )
    samples_per_prompt: int = Field(
        16, ge=1, le=1_024, description="k: samples drawn per prompt at each evaluated version."
    )
    metrics: list[str] = Field(
        default_factory=lambda: ["mean@k", "pass@k"],
        min_length=1,
        description="What to report: mean@K (mean pass rate of K samples), pass@K (unbiased estimator, Chen et al. 2021), maj@K (majority vote of K answers); K an integer <= samples_per_prompt, or the letter k for samples_per_prompt.",
    )

    @field_validator("metrics")
    @classmethod
    def _metric_names(cls, value: list[str]) -> list[str]:
        return _check_metric_names(value)

    @model_validator(mode="after")
    def _k_fits(self) -> EvalSetConfig:
        self.metric_ks()
        return self

    def metric_ks(self) -> list[tuple[str, int]]:
        """(kind, K) per reported metric, the letter k resolved to samples_per_prompt."""
        return _metric_ks(
            self.metrics,
            self.samples_per_prompt,
            f"evaluation set {self.name!r}",
            "its samples_per_prompt",
        )


class EvaluationConfig(_Section):
    every_steps: int = Field(
        100,
        ge=1,
        description="Evaluate the held-out pass rate every this many trainer steps (paper: 100).",
    )
    samples_per_prompt: int = Field(
        16,
        ge=1,
        le=1_024,
        description="Samples per held-out prompt; the pass rate is their mean (paper: 16).",
    )
    sets: list[EvalSetConfig] = Field(
        default_factory=list,
        description="Named evaluation sets (e.g. an AIME-style and a MATH-500-style set), each scored at every evaluated version besides the held-out split ('heldout', from data.num_eval_prompts).",
    )
    fit_set: str = Field(
        HELDOUT_SET,
        min_length=1,
        description="The set whose mean pass rate (mean@k) is the run's pass-rate curve: the sigmoid fit, the report's curve and the comparison; 'heldout' or a name in evaluation.sets.",
    )
    heldout_metrics: list[str] = Field(
        default_factory=lambda: ["mean@k", "pass@k"],
        min_length=1,
        description="Metrics reported for the held-out set (as evaluation.sets[].metrics; k = evaluation.samples_per_prompt).",
    )

    @field_validator("heldout_metrics")
    @classmethod
    def _heldout_metric_names(cls, value: list[str]) -> list[str]:
        return _check_metric_names(value)

    @model_validator(mode="after")
    def _sets_named_once(self) -> EvaluationConfig:
        names = [s.name for s in self.sets]
        for name in names:
            if name == HELDOUT_SET:
                raise ValueError(
                    f"evaluation.sets has a set named {HELDOUT_SET!r}, the name of the held-out "
                    "split of data.source. Fix: give the set another name."
                )
            if names.count(name) > 1:
                raise ValueError(
                    f"evaluation.sets names {name!r} {names.count(name)} times. Fix: give every "
                    "set its own name."
                )
        if self.fit_set not in (HELDOUT_SET, *names):
            raise ValueError(
                f"evaluation.fit_set = {self.fit_set!r} is not an evaluation set; allowed: "
                f"{', '.join([HELDOUT_SET, *names])}. Fix: name one of them."
            )
        self.heldout_metric_ks()
        return self

    def set_names(self, num_eval_prompts: int) -> list[str]:
        """Every evaluated set: 'heldout' (when data.num_eval_prompts > 0), then evaluation.sets."""
        return ([HELDOUT_SET] if num_eval_prompts > 0 else []) + [s.name for s in self.sets]

    def heldout_metric_ks(self) -> list[tuple[str, int]]:
        """(kind, K) per held-out metric, the letter k resolved to samples_per_prompt."""
        return _metric_ks(
            self.heldout_metrics,
            self.samples_per_prompt,
            "evaluation.heldout_metrics",
            "evaluation.samples_per_prompt",
        )

    temperature: float = Field(
        1.0, gt=0.0, le=10.0, description="Sampling temperature for evaluation."
    )
    gpu_memory_utilization: float = Field(
        0.25,
        gt=0.0,
        le=1.0,
        description="vLLM runs only: share of accelerator memory of the evaluation engine, which runs in its own process beside the generator's (vLLM allows one engine per process); generation + evaluation shares must stay <= 0.95. With placement.evaluation_devices the evaluation has devices of its own and takes generation.gpu_memory_utilization there instead.",
    )
    nice: int = Field(
        10,
        ge=0,
        le=19,
        description="CPU scheduling niceness added to each evaluation process (Unix): evaluations are not on the training path, so where CPU is short they yield it to the generators and the trainer and catch up when it is free (the run waits for every due evaluation before its fit). 0: the same priority. Not applied with pipeline.isolation = thread, where an evaluation is a thread of the flow process.",
    )


class PlacementConfig(_Section):
    """Which processes run where: scalerl/placement.py plans it (`scalerl plan CONFIG`)."""

    accelerator: Literal["auto", "cuda", "cpu"] = Field(
        "auto",
        description="cuda: each process gets its own CUDA_VISIBLE_DEVICES and memory is checked by arithmetic; cpu: the same processes without devices (trainer ranks over gloo); auto: cuda where a GPU is visible.",
    )
    nodes: int = Field(1, ge=1, le=4_096, description="Machines the run uses.")
    devices_per_node: int = Field(
        8, ge=1, le=64, description="Accelerators per machine (ignored on cpu)."
    )
    device_memory_gib: float = Field(
        80.0, gt=0.0, le=4_096.0, description="Memory of one accelerator (H100: 80, H200: 141)."
    )
    trainer_ranks: int = Field(
        4,
        ge=1,
        le=65_536,
        description="Trainer processes: 1 runs in a forked child; more run under torchrun (FSDP2; NCCL on cuda, gloo on cpu). The default, 4 trainer + 4 generator GPUs, is one 8-GPU node: 8B's fp32 weights, gradients and AdamW moments take 122 GiB, more than one 80 GiB GPU.",
    )
    trainer_devices: list[int] | None = Field(
        None,
        description="Device of each trainer rank, as node x devices_per_node + local index; default: the first trainer_ranks devices.",
    )
    tensor_parallel: int = Field(
        1, ge=1, le=64, description="Devices of one generator engine (vLLM tensor parallelism)."
    )
    generator_devices: list[int] | None = Field(
        None,
        description="Devices of the generators, tensor_parallel per generator in order (gen0 first); default: the devices after the trainer's and the evaluation's.",
    )
    evaluation_devices: list[int] | None = Field(
        None,
        description="None: the evaluation engine runs beside gen0 on its devices with evaluation.gpu_memory_utilization of their memory; a list of tensor_parallel devices: on its own devices.",
    )
    colocate: bool = Field(
        False,
        description="Let the trainer share devices with the generators (one-GPU machines): the generators then start again from device 0, and the trainer gets what generation + evaluation shares of memory leave. Otherwise a device given to two processes is refused.",
    )
    trainer_deployment: str | None = Field(
        None,
        description="Where the trainer runs: None, on the run flow's machine (torchrun there with placement.trainer_ranks ranks); or a Prefect deployment, 'FLOW/DEPLOYMENT' of flows/train_node.py, which the run starts placement.nodes times (one child flow run per node, each running torchrun with trainer_ranks / nodes ranks, joined by a c10d rendezvous). A lost node fails the attempt: the others are cancelled and a new attempt resumes from the last checkpoint.",
        pattern=r"^[^/\s]+/[^/\s]+$",
    )
    rendezvous: str | None = Field(
        None,
        description="placement.trainer_deployment: the c10d rendezvous endpoint HOST:PORT of the trainer nodes. None: node 0 picks its host's address and a free port and publishes it in the run store (marker trainer-rendezvous-ATTEMPT) for the other nodes.",
        pattern=r"^[^:\s]+:[0-9]+$",
    )
    generators_deployment: str | None = Field(
        None,
        description="Where the generators run: None, on the run flow's machine (a process each); or a Prefect deployment, 'FLOW/DEPLOYMENT' of flows/generate.py (e.g. 'scalerl-generate/gpu-generators' on a work pool of GPU machines), which the run starts once per generator as a child flow run (run_deployment) that shares nothing with this machine but the run store. A lost one is replaced.",
        pattern=r"^[^/\s]+/[^/\s]+$",
    )


def check_endpoint_url(value: str, name: str) -> None:
    """Raise ValueError (one line, the URL not echoed: it may carry a signature) unless `value`
    is an http(s) endpoint: scheme, host, a port in 1-65535, no path, query or fragment. botocore
    would otherwise fail at the first request with a traceback that prints the whole URL."""
    from urllib.parse import urlsplit

    fix = f"Fix: set {name} to the endpoint alone, e.g. http://127.0.0.1:9000 or https://s3.example.com."
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError(
            f"{name} must start with http:// or https:// (it starts with "
            f"{(parts.scheme + '://') if parts.scheme else 'no scheme'}). {fix}"
        )
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname or port == -1 or port == 0:
        what = "no host" if not parts.hostname else "a port outside 1-65535 (or not a number)"
        raise ValueError(f"{name} has {what}. {fix}")
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ValueError(
            f"{name} has a path, query string or fragment after the host (not shown: it may "
            f"carry a signature), which S3 clients do not take. {fix}"
        )


class StorageConfig(_Section):
    url: str = Field(
        "./runs",
        min_length=1,
        description="Root of the run store: s3://bucket/prefix, a local path, or memory:// for tests. A relative path (the default ./runs) is resolved against the working directory of the process that runs the flow: for `scalerl run`, where you run it; for a process worker of prefect.yaml, the project directory `prefect deploy` ran in. Give an absolute path or an s3:// URL when several machines share runs.",
    )
    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint (MinIO, Ceph, R2); credentials come from AWS_* variables, never from here.",
    )
    run_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="Run id (the run's directory under url). Unset: a new timestamped id (e.g. 20261125-153012-a1b2); a Retry of the flow run in the UI resumes the run its first attempt started. Set to an existing run's id to resume it with the same config (or use the scalerl-resume deployment, which needs only the id).",
    )

    @field_validator("url", "endpoint_url")
    @classmethod
    def _no_credentials_in_urls(cls, value: str | None, info: ValidationInfo) -> str | None:
        # The value is never echoed: it may hold a password.
        if value is not None and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@", value):
            raise ValueError(
                f"storage.{info.field_name} carries credentials (user:password@ in the URL); "
                "the configuration is saved in run.json and shown in the Prefect UI. Fix: drop "
                "them from the URL and export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                "AWS_PROFILE) instead."
            )
        if value is not None and info.field_name == "endpoint_url":
            check_endpoint_url(value, "storage.endpoint_url")
        return value


class ScheduleConfig(_Section):
    max_steps: int = Field(
        5_000, ge=1, le=10_000_000, description="Stop after this many trainer steps."
    )
    compute_budget: float | None = Field(
        None, gt=0.0, description="Stop when this much compute (in compute_unit) is spent."
    )
    compute_unit: Literal["steps", "samples", "tokens", "gpu_hours"] = Field(
        "samples", description="Compute axis of the scaling fit and of compute_budget."
    )


class MlflowTracking(_Section):
    tracking_uri: str = Field(
        min_length=1,
        description="Where MLflow keeps the run: a server URL (http://host:5000), sqlite:///path/mlflow.db or a local directory. Credentials never go here: MLflow reads MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN from the environment.",
    )
    experiment: str = Field(
        "scalerl", min_length=1, description="MLflow experiment (created when missing)."
    )
    run_name: str | None = Field(None, description="MLflow run name. Unset: the run id.")

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@", value):  # never echoed
            raise ValueError(
                "tracking.mlflow.tracking_uri carries credentials (user:password@ in the URL); "
                "the configuration is saved in run.json and shown in the Prefect UI. Fix: drop "
                "them from the URL and export MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead."
            )
        return value


class TensorBoardTracking(_Section):
    log_dir: str | None = Field(
        None,
        description="Directory of the event files (a local path; one subdirectory per run id). Unset: {storage.url}/{run_id}/tensorboard for a local store (an s3:// store needs it set).",
    )


class WandbTracking(_Section):
    project: str = Field(min_length=1, description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (user or team). Unset: your default.")
    mode: Literal["online", "offline", "disabled"] = Field(
        "online",
        description="online logs to the W&B server (WANDB_API_KEY from the environment, never here); offline writes under WANDB_DIR for `wandb sync`; disabled logs nothing.",
    )
    group: str | None = Field(None, description="W&B run group.")
    tags: list[str] = Field(default_factory=list, description="W&B run tags.")


class TrackingConfig(_Section):
    mlflow: MlflowTracking | None = Field(
        None,
        description="Mirror the run to MLflow; fields: tracking_uri (required), experiment (default scalerl), run_name (default: the run id).",
    )
    tensorboard: TensorBoardTracking | None = Field(
        None,
        description="Mirror the run to TensorBoard event files; field: log_dir (default: under the run's directory for a local store). `{}` turns it on with the defaults.",
    )
    wandb: WandbTracking | None = Field(
        None,
        description="Mirror the run to Weights & Biases; fields: project (required), entity, mode (online, offline, disabled; default online), group, tags.",
    )


class RunConfig(_Section):
    """A whole ScaleRL run. The flow's parameter, the YAML file and the CLI all validate against it."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Policy model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Prompts and verifier.")
    generation: GenerationConfig = Field(
        default_factory=GenerationConfig, description="Generators and sampling."
    )
    length_control: LengthControlConfig = Field(
        default_factory=LengthControlConfig, description="Interruption-based length control."
    )
    algorithm: AlgorithmConfig = Field(
        default_factory=AlgorithmConfig,
        description="Loss, advantages, filtering, curriculum, precision.",
    )
    pipeline: PipelineConfig = Field(
        default_factory=PipelineConfig, description="PipelineRL-k asynchrony."
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="AdamW.")
    trainer: TrainerConfig = Field(
        default_factory=TrainerConfig, description="Trainer memory, checkpoints, safety."
    )
    evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig, description="Held-out validation."
    )
    storage: StorageConfig = Field(
        default_factory=StorageConfig, description="Object storage of the run."
    )
    weights: WeightsConfig = Field(
        default_factory=StoreWeightsConfig,
        description="How weight versions travel, what is durable when, and retention; chosen by its 'transport': store, local or nccl, each with its own fields.",
        json_schema_extra=lambda schema: _choice_for_forms(schema, StoreWeightsConfig),
    )
    placement: PlacementConfig = Field(
        default_factory=PlacementConfig,
        description="Processes, nodes and devices (scalerl plan CONFIG prints the plan).",
    )
    schedule: ScheduleConfig = Field(
        default_factory=ScheduleConfig, description="When the run ends."
    )
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig,
        description="Experiment trackers the run is mirrored to (runtime/tracking/): its config as parameters (secrets redacted), trainer metrics per step, evaluations per version, the scaling fit, plots, completion samples and the final status. None by default; a tracker that fails never fails the run.",
    )

    @property
    def completions_per_batch(self) -> int:
        return self.generation.prompts_per_batch * self.generation.samples_per_prompt

    @field_validator("weights", mode="before")
    @classmethod
    def _weights_variant(cls, data: Any) -> Any:
        return _weights_variant(data)

    @model_validator(mode="after")
    def _cross_field_checks(self) -> RunConfig:
        gen, lc = self.generation, self.length_control
        if (
            gen.completions_per_batch is not None
            and gen.completions_per_batch != self.completions_per_batch
        ):
            raise ValueError(
                f"generation.completions_per_batch = {gen.completions_per_batch} must equal "
                f"generation.prompts_per_batch x generation.samples_per_prompt = "
                f"{gen.prompts_per_batch} x {gen.samples_per_prompt} = {self.completions_per_batch}. "
                "Fix: change one of the three, or drop completions_per_batch."
            )
        if self.data.num_eval_prompts == 0 and self.evaluation.fit_set == HELDOUT_SET:
            raise ValueError(
                "data.num_eval_prompts = 0 leaves no held-out set, but evaluation.fit_set = "
                f"{HELDOUT_SET!r}; allowed num_eval_prompts range [1, 1000000] unless another set "
                "is fitted. Fix: raise data.num_eval_prompts, or list evaluation.sets and set "
                "evaluation.fit_set to one of them."
            )
        from scalerl.modes import check_modes  # (it reads this model's fields only)

        check_modes(self)
        if lc.enabled:
            if lc.thinking_budget_min > lc.thinking_budget_max:
                raise ValueError(
                    f"length_control.thinking_budget_min = {lc.thinking_budget_min} is above "
                    f"length_control.thinking_budget_max = {lc.thinking_budget_max}; allowed range "
                    f"[1, {lc.thinking_budget_max}]. Fix: make min <= max."
                )
            room = gen.max_new_tokens - lc.answer_budget
            need = lc.answer_budget + lc.thinking_budget_max
            if lc.thinking_budget_max > room >= lc.thinking_budget_min:
                raise ValueError(
                    f"length_control.thinking_budget_max = {lc.thinking_budget_max} puts the interruption "
                    f"window outside the generation budget; allowed range "
                    f"[{lc.thinking_budget_min}, {room}] (length_control.thinking_budget_min "
                    f"{lc.thinking_budget_min} .. generation.max_new_tokens {gen.max_new_tokens} - "
                    f"length_control.answer_budget {lc.answer_budget}). Fix: lower the window or "
                    f"raise generation.max_new_tokens to at least {need}."
                )
            if lc.thinking_budget_max > room and need <= _MAX_NEW_TOKENS:
                raise ValueError(  # not even the window's low end fits: the budget must rise
                    f"generation.max_new_tokens = {gen.max_new_tokens} leaves no room for the "
                    f"interruption window: it must be at least length_control.answer_budget "
                    f"{lc.answer_budget} + length_control.thinking_budget_max "
                    f"{lc.thinking_budget_max} = {need}; allowed range [{need}, {_MAX_NEW_TOKENS}]. "
                    f"Fix: raise generation.max_new_tokens to at least {need}, lower "
                    "length_control.answer_budget and the window (thinking_budget_min/max), or set "
                    "length_control.enabled=false."
                )
            if lc.thinking_budget_max > room:
                raise ValueError(
                    f"length_control.answer_budget {lc.answer_budget} + "
                    f"length_control.thinking_budget_max {lc.thinking_budget_max} = {need} is "
                    f"above the largest generation.max_new_tokens, {_MAX_NEW_TOKENS}. Fix: lower "
                    f"them to {_MAX_NEW_TOKENS} or less in all."
                )
        if (
            self.model.name_or_path == _BUILTIN_TINY_WARM
            and self.data.task != "arithmetic"
            and not self.data.source.startswith("synthetic:arithmetic")
        ):  # the same rule as runtime/common.py::_warm_tiny_model, checked before anything is written
            raise ValueError(
                f"model.name_or_path = {_BUILTIN_TINY_WARM!r} is warm-started on arithmetic, but "
                f"data.source = {self.data.source!r} with data.task = {self.data.task!r}. Fix: use "
                f"synthetic:arithmetic or a file with data.task=arithmetic, or {_BUILTIN_TINY!r}."
            )
        from scalerl.placement import check_layout  # devices only: no model, no torch

        check_layout(self)
        loss = self.algorithm.loss
        if isinstance(loss, DAPOLoss) and loss.eps_high < loss.eps_low:
            raise ValueError(
                f"algorithm.loss.eps_high = {loss.eps_high} is below eps_low = {loss.eps_low}; "
                f"allowed range [{loss.eps_low}, 10]. Fix: DAPO's clip-higher needs eps_high >= eps_low."
            )
        return self


# The built-in models of runtime/common.py (named here too: config must not import the tasks).
_BUILTIN_TINY = "builtin:tiny"
_BUILTIN_TINY_WARM = "builtin:tiny-warm"


def _tiny_cpu() -> dict[str, Any]:
    # The tiny model warm-started on arithmetic (scalerl/warmstart.py) answers with the bare
    # integer then EOS, so completions are a few tokens: small budgets keep a whole learning
    # run (bench/demo_learning.py) within 15 minutes on 2 CPU cores. 500 steps: at 300 the
    # curve had not bent yet by mid-run, and the half-run prediction missed by up to 0.08.
    # 128 held-out prompts: with 64, consecutive evaluations differed by up to 0.08 (prompt
    # sampling noise), as much as the half-run check's 0.05 tolerance.
    return {
        # a 2-layer model keeps its activations: recomputing them only costs time
        "model": {
            "name_or_path": "builtin:tiny-warm",
            "dtype": "float32",
            "gradient_checkpointing": False,
        },
        "data": {
            "source": "synthetic:arithmetic-easy",
            "num_train_prompts": 2_048,
            "num_eval_prompts": 128,
        },
        "generation": {
            "engine": "transformers",
            "prompts_per_batch": 8,
            "samples_per_prompt": 16,
            "max_prompt_tokens": 32,
            "max_new_tokens": 12,
            # one row per sample of a batch (8 x 16), as TRL decodes it: the engine alone makes
            # 1,134 samples/s with 128 rows, 879 with 64 (fewer, wider forward calls)
            "max_batch_size": 128,
            "gpu_memory_utilization": 0.3,
            "num_generators": 1,
        },
        "length_control": {
            "thinking_budget_min": 6,
            "thinking_budget_max": 8,
            "answer_budget": 4,
        },
        "optimizer": {"lr": 1.5e-4, "warmup_steps": 2},
        # a checkpoint (weights + AdamW state) every 10 steps cost 6% of the trainer's CPU; 50
        # steps of this model are ~7 s of work to redo after a crash
        "trainer": {"micro_batch_tokens": 4_096, "checkpoint_every": 50},
        # generator and trainer processes, one core each, beside the flow process's stages;
        # no Prefect task run per shard: with a 2-layer model a task run (client + server CPU)
        # costs more than generating the shard, so one advance-stream task runs the stages.
        # k = 8 as in the paper: at k = 2 the trainer waited on dropped stale groups (vs_trl,
        # 100 steps: 520 trained samples/s at k = 2, 620-716 at k = 4 and 8). But generation
        # keeps up with training here, so a queue bounded by k alone filled up: batches were
        # trained 6 versions stale on average and one 200-step run in three fell from 0.54 to
        # 0.45 (importance ratios up to 1,682). Two queued batches: staleness 2, nothing dropped.
        "pipeline": {
            "max_off_policy_steps": 8,
            "max_queued_batches": 2,
            "torch_threads": 1,
            "stage_tasks": "stream",
        },
        "evaluation": {"every_steps": 20, "samples_per_prompt": 8},
        "schedule": {"max_steps": 500, "compute_unit": "samples"},
        "placement": {"accelerator": "cpu", "trainer_ranks": 1},
    }


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's recipe as published (sec. 7); point model.name_or_path at your base model.
    "paper": {},
    # A whole pipeline on 2 CPU cores in minutes: tiny local model, small batches and budgets.
    "tiny-cpu": _tiny_cpu(),
}


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `update` merged into `base`; neither input (nor PRESETS) is ever mutated."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


_LOSS_TYPES = {"cispo": CISPOLoss, "grpo": GRPOLoss, "dapo": DAPOLoss, "gspo": GSPOLoss}


# The discriminated unions: where each sits, its tag field, and its variants by tag.
_UNIONS: dict[tuple[str, ...], tuple[str, dict[str, type[BaseModel]]]] = {
    ("algorithm", "loss"): ("type", _LOSS_TYPES),
    ("weights",): ("transport", _TRANSPORTS),
}


def _untagged(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """An error location without the variant tag pydantic puts after a union's path
    (('weights', 'local', 'local_dir') -> ('weights', 'local_dir'))."""
    for at, (_, variants) in _UNIONS.items():
        n = len(at)
        if loc[:n] == at and len(loc) > n and loc[n] in variants:
            return loc[:n] + loc[n + 1 :]
    return loc


def _model_at(path: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `path` (for 'did you mean' suggestions)."""
    for at, (_, variants) in _UNIONS.items():
        if len(path) == len(at) + 1 and path[:-1] == at and path[-1] in variants:
            return variants[str(path[-1])]
    model: type[BaseModel] | None = RunConfig
    for part in path:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
    return model


_SECRET_KEY = re.compile(r"key|secret|token|password|credential|profile", re.IGNORECASE)


def _format_error(err: dict[str, Any]) -> str:
    full = tuple(err["loc"])
    loc = _untagged(full)
    path = ".".join(str(p) for p in loc) or "<config>"
    if err["type"] == "union_tag_invalid" and tuple(loc) in _UNIONS:
        tag, variants = _UNIONS[tuple(loc)]
        what = "loss" if tag == "type" else tag
        valid = ", ".join(sorted(variants))
        return f"{path}.{tag} = {err['ctx']['tag']!r} is not a known {what}; valid: {valid}"
    if err["type"] == "extra_forbidden" and loc[0] == "storage" and _SECRET_KEY.search(path):
        return (  # never echo the value: it is a secret
            f"unknown key '{path}': credentials never go in the run configuration (it is saved "
            "in run.json and shown in the Prefect UI). Fix: export AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment of every process of the run."
        )
    if err["type"] == "extra_forbidden":
        owner = _model_at(full[:-1])
        valid = sorted(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = (
            f"did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?"
            if close
            else f"valid keys here: {', '.join(valid)}"
        )
        return f"unknown key '{path}'; {hint}"
    if err["type"] == "value_error":  # our cross-field checks carry their own path and fix
        return str(err["msg"]).removeprefix("Value error, ")
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    return f"{path} = {shown}: {err['msg']}. Fix: {_field_fix(err['type'], full, path)}"


def _field_fix(kind: str, full: tuple[str | int, ...], path: str) -> str:
    """What a valid value of the field at `full` looks like (its choices, bounds or pattern)."""
    if kind in ("literal_error", "enum"):
        return f"set {path} to one of the values listed."
    if kind == "string_too_short":
        return f"give {path} a non-empty value."
    owner = _model_at(full[:-1]) if full and isinstance(full[-1], str) else None
    field = owner.model_fields.get(str(full[-1])) if owner else None
    if field is None:
        return f"see {path} in docs/CONFIG.md (`scalerl config show` prints the valid defaults)."
    low = high = None
    for m in field.metadata:
        for attr, bracket in (("ge", "["), ("gt", "(")):
            if getattr(m, attr, None) is not None:
                low = f"{bracket}{getattr(m, attr)}"
        for attr, bracket in (("le", "]"), ("lt", ")")):
            if getattr(m, attr, None) is not None:
                high = f"{getattr(m, attr)}{bracket}"
        if getattr(m, "pattern", None) == StorageConfig.model_fields["run_id"].metadata[0].pattern:
            return (
                f"set {path} to 1-128 letters, digits, '.', '_' or '-', starting with a "
                "letter or digit."
            )
    if low or high:
        return f"set {path} within {low or '(-inf'}, {high or 'inf)'}."
    return f"set {path} to a value of the documented type (docs/CONFIG.md)."


def validate_config(data: dict[str, Any]) -> RunConfig:
    """Validate a plain dict into a RunConfig, turning pydantic's report into a ConfigError."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_format_error(e) for e in exc.errors()]
        raise ConfigError("invalid run configuration:\n  " + "\n  ".join(lines)) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """'generation.samples_per_prompt=8' -> (['generation', 'samples_per_prompt'], 8)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip() or any(not p for p in key.strip().split(".")):
        raise ConfigError(
            f"override '{item}' is not of the form section.field=value. Fix: e.g. generation.samples_per_prompt=8"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = _deep_merge({}, data)
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def load_config(
    path: str | Path | None = None, *, preset: str | None = None, overrides: list[str] | None = None
) -> RunConfig:
    """Preset, then YAML file, then dotted overrides; validated once at the end."""
    data: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            close = difflib.get_close_matches(preset, list(PRESETS), n=1)
            hint = f" Fix: did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown preset '{preset}'; valid presets: {', '.join(PRESETS)}.{hint}"
            )
        data = _deep_merge(data, PRESETS[preset])
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist. Fix: pass the path of a YAML file.")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"config file {p} is not valid YAML ({exc.__class__.__name__}). Fix: check its syntax."
            ) from None
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {p} must hold a mapping of sections (model:, data:, ...), not {type(loaded).__name__}."
            )
        data = _deep_merge(data, loaded)
    return validate_config(apply_overrides(data, overrides or []))


def dump_config(config: RunConfig) -> str:
    """YAML text of a config, loadable again by load_config."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
