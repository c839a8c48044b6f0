"""`scalerl runs export-model`: a weights version of a run as a Hugging Face model folder.

    export_model(run, version=None, out_dir="qwen3-rl", overwrite=False) -> summary dict

A published weights version is already a `save_pretrained` folder (model, config, generation
config, tokenizer: runtime/transports/publisher.py), so the export downloads it with every
file's sha256 checked against the version's manifest (a damaged version is refused, naming the
file, never exported), adds a model card (README.md: the run, the version, its base model and
recipe, the evaluation at that version) and `scalerl_export.json` (the same facts as data),
and moves the whole folder into place at once: an interrupted export leaves no half folder
under the name asked for, and an existing non-empty folder is replaced only with overwrite.

A LoRA run (model.lora) publishes adapters (scalerl/lora.py): its export is the base model
(version 0) with the version's adapter merged into the weights (peft's merge_and_unload, in
float32, saved in the run's model dtype), which transformers loads without peft; with
adapter_only it is the adapter alone (adapter_config.json naming the run's base model,
adapter_model.safetensors) plus the tokenizer, and only version 0's small files are downloaded
for it (tokenizer, config), not the base's weights. Every download is sha256-checked.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from storage.errors import InvalidInputError

CARD = "README.md"
FACTS = "scalerl_export.json"


def pick_version(run, version: int | None) -> int:
    """`version`, or the newest published one; one line naming what exists when it does not."""
    versions = run.list_weight_versions()
    if not versions:
        raise InvalidInputError(
            f"run {run.run_id} has published no weights yet. Fix: export after its trainer "
            "has published a version (scalerl runs ls shows its step)."
        )
    if version is None:
        return max(versions)
    if version not in versions:
        shown = ", ".join(map(str, versions[-10:]))
        raise InvalidInputError(
            f"run {run.run_id} has no weights version {version}: it keeps {len(versions)} "
            f"version(s) ({'..., ' if len(versions) > 10 else ''}{shown}); older ones may have "
            "been pruned by retention (weights.keep_last / keep_every). Fix: pass one of those "
            "to --version, or leave it out for the newest."
        )
    return version


def evaluation_at(run, version: int) -> dict | None:
    """The `eval` row of `version`, else of the newest version evaluated before it (marked)."""
    rows = [r for r in run.read_metrics("eval").to_pylist() if r.get("version") is not None]
    exact = [r for r in rows if r["version"] == version]
    if exact:
        return {**exact[-1], "exact": True}
    before = [r for r in rows if r["version"] < version]
    return {**max(before, key=lambda r: r["version"]), "exact": False} if before else None


_WHAT = {
    "full": "",
    "merged": " Trained as a LoRA adapter, merged here into the base model's weights.",
    "adapter": " This folder is the LoRA adapter alone (peft's format): load it on the base "
    "model with peft (PeftModel.from_pretrained) or serve it with vLLM's LoRA support.",
}


def model_card(run, version: int, config: dict, evaluation: dict | None, what: str = "full") -> str:
    model = config.get("model") or {}
    algo = config.get("algorithm") or {}
    loss = (algo.get("loss") or {}).get("type", "?")
    base = model.get("name_or_path", "?")
    hub_base = "/" in str(base) and not str(base).startswith(("/", ".", "builtin:"))
    library = "peft" if what == "adapter" else "transformers"
    lines = ["---", f"library_name: {library}", "tags:", "- scalerl", "- reinforcement-learning"]
    if hub_base:
        lines.append(f"base_model: {base}")
    lines += ["---", "", f"# {run.run_id} at weights version {version}", ""]
    lines += [
        f"Trained with reinforcement learning by the ScaleRL pipeline: run `{run.run_id}`, "
        f"weights version {version} (the weights after trainer step {version}), from base "
        f"model `{base}`.{_WHAT[what]}",
        "",
        "| recipe | value |",
        "|---|---|",
        f"| loss | {loss} |",
        f"| loss aggregation | {algo.get('aggregation', '?')} |",
        f"| advantage normalization | {algo.get('advantage_normalization', '?')} |",
        f"| max off-policy steps (k) | {(config.get('pipeline') or {}).get('max_off_policy_steps', '?')} |",
        f"| samples per prompt | {(config.get('generation') or {}).get('samples_per_prompt', '?')} |",
        f"| data | {(config.get('data') or {}).get('source', '?')} |",
        *([f"| LoRA | rank {model['lora'].get('rank')}, alpha {model['lora'].get('alpha')}, "
           f"on {', '.join(model['lora'].get('target_modules') or [])} |"]
          if model.get("lora") else []),
        "",
    ]  # fmt: skip
    if evaluation is None:
        lines.append("Not evaluated at or before this version.")
    else:
        where = (
            f"at version {evaluation['version']}"
            if evaluation["exact"]
            else f"at version {evaluation['version']}, the last evaluated before {version}"
        )
        se = evaluation.get("pass_rate_se")
        rate = f"{evaluation['pass_rate']:.4f}" + (f" ± {se:.4f} (s.e.)" if se is not None else "")
        lines.append(
            f"Held-out pass rate {where}: {rate} over {evaluation.get('samples', '?')} samples "
            f"of {evaluation.get('prompts', '?')} prompts."
        )
    lines += [
        "",
        f"Exported {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
        f"`scalerl runs export-model {run.run_id} --version {version}`.",
        "",
    ]
    return "\n".join(lines)


def _lora_files(run, version: int, staging: Path, config: dict, adapter_only: bool) -> None:
    """A LoRA run's version into `staging` (module docstring): the base (version 0) with the
    adapter merged into its weights, or the adapter alone with the tokenizer."""
    from scalerl import lora

    with tempfile.TemporaryDirectory(prefix="scalerl-export-") as tmp:
        # the adapter alone needs only the base's tokenizer and config, not its weights
        small = [
            f
            for f in run.weights_files(0)
            if f.startswith(f"{lora.ADAPTER_DIR}/")
            or not f.endswith((".safetensors", ".safetensors.index.json"))
        ]
        files = small if adapter_only else None
        base = run.download_weights(0, Path(tmp) / "v0", checksum=True, files=files)
        here = (
            base if version == 0 else run.download_weights(version, Path(tmp) / "v", checksum=True)
        )
        adapter = lora.adapter_dir(here)
        if adapter is None:
            raise InvalidInputError(
                f"weights version {version} of run {run.run_id} holds no adapter although the "
                "run's config sets model.lora. Fix: export another version (scalerl runs "
                "verify names what is wrong with this one)."
            )
        model_cfg = config.get("model") or {}
        if adapter_only:
            for f in adapter.iterdir():
                shutil.copyfile(f, staging / f.name)
            facts = json.loads((staging / lora.CONFIG_FILE).read_text())
            facts["base_model_name_or_path"] = model_cfg.get("name_or_path")
            (staging / lora.CONFIG_FILE).write_text(json.dumps(facts, indent=1))
        else:
            _merge(base, adapter, staging, model_cfg.get("dtype", "float32"))
        from scalerl.models import load_tokenizer

        # the tokenizer as published with the base, saved as transformers saves it (the chat
        # template, added tokens and special tokens files included)
        load_tokenizer(str(base)).save_pretrained(staging)


def _merge(base: Path, adapter: Path, out: Path, dtype: str) -> None:
    """base + adapter merged (W + alpha / r * B A, computed in float32), saved in the run's
    model dtype: what transformers loads without peft."""
    from peft import PeftModel

    from scalerl.models import load_policy, torch_dtype

    model, _ = load_policy(str(base), dtype="float32")
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.to(torch_dtype(dtype)).save_pretrained(out, safe_serialization=True)


def export_model(
    run, version: int | None, out_dir, *, overwrite: bool = False, adapter_only: bool = False
) -> dict:
    """The export (module docstring); adapter_only: a LoRA run's adapter alone, for peft or
    vLLM's LoRA serving, instead of the merged model."""
    config = run.read_config()
    is_lora = (config.get("model") or {}).get("lora") is not None
    if adapter_only and not is_lora:
        raise InvalidInputError(
            f"run {run.run_id} trained full weights (its config has no model.lora): there is "
            "no adapter to export. Fix: leave out --adapter-only."
        )
    version = pick_version(run, version)
    out = Path(out_dir).expanduser().resolve()
    if run.is_local and out.is_relative_to(Path(run.url).resolve()):
        raise InvalidInputError(
            f"{out} is inside run {run.run_id}'s directory, which holds only what the run "
            "commits (verify would call the export a foreign file). Fix: give -o a folder "
            "outside the run store's run directories."
        )
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"{out} is a file. Fix: give -o a folder path.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InvalidInputError(
            f"{out} is not empty. Fix: give -o a new folder, or --overwrite to replace it."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        if is_lora:
            _lora_files(run, version, staging, config, adapter_only)
        else:
            run.download_weights(version, staging, checksum=True)  # every file's sha256 checked
        evaluation = evaluation_at(run, version)
        what = "adapter" if adapter_only else "merged" if is_lora else "full"
        (staging / CARD).write_text(model_card(run, version, config, evaluation, what))
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        facts = {
            "run_id": run.run_id,
            "version": version,
            "base_model": (config.get("model") or {}).get("name_or_path"),
            "weights": what,
            "lora": (config.get("model") or {}).get("lora"),
            "evaluation": evaluation,
            "files": files,
            "exported_at": time.time(),
        }
        (staging / FACTS).write_text(json.dumps(facts, indent=1, default=str))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"version": version, "dir": str(out), "files": len(files) + 1, "bytes": size}
