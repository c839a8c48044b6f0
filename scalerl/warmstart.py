"""Supervised warm-start of the tiny model on easy arithmetic, so RL has something to sharpen.

    path = warm_start_tiny(tmp / "tiny-warm", seed=0, exclude=eval_prompts)  # ~4.5 min, 1 core
    model, tokenizer = load_policy(str(path))
    rows = task_rows(2_112, seed=0)   # prompts from the same distribution, for a run's data file

Why: a random tiny model passes nothing, every group then has zero variance and RL learns
nothing. The paper starts from a pretrained, instruction-tuned model whose pass rate is already
in a learnable range; this is the CPU stand-in. The tiny model (scalerl.models.build_tiny_model)
is trained by teacher forcing on ``prompt + completion + EOS`` with the loss on the completion
tokens only. The completion is ``<think>`` + the answer's digits reversed (sign last) +
``</think>`` + the answer: least-significant digit first, the carry flows forward, which a
2-layer model learns in minutes (with the bare answer it reached only ~36% greedy). The scorer
reads the answer after ``</think>``.

What it is trained on: ``a+b=`` / ``a-b=`` with 1-2 digit operands (WarmStartSpec). A 2-layer,
128-wide model does not learn synthetic:arithmetic's own mix (2-3 digit operands, 2-3 terms,
products) in minutes on a CPU (tried: 1,200 steps, loss stuck near 1.2-1.5 nats per digit, no
exact answers), so the learning demo (bench/demo_learning.py) and the tiny-cpu preset
(synthetic:arithmetic-easy) run on prompts of this easier distribution.

Where the starting point comes from: label smoothing (0.3) leaves every token's distribution
diffuse. After 2,500 steps the *greedy* completion is right on 98% of 64 held-out problems, a
*sampled* one (temperature 1) on ~8% (64 x 8 samples): the policy "knows" the answer but samples
it rarely, like a pretrained model whose pass@1 is far below its best-of-k. RL closes that gap
by sharpening the distribution, so the sampled held-out pass rate has a long way to climb.

Deterministic: the same arguments on the same machine give byte-identical safetensors (seeded
init, seeded data, one thread, deterministic algorithms). Training prompts come from their own
seed, and any prompt in ``exclude`` (the run's held-out set) is skipped.

Shipped weights: the warm model of the tiny-cpu preset (data.seed 0, its 128 held-out prompts
excluded) is in the repository, scalerl/assets/tiny-warm/, with a manifest that records the
inputs and every file's sha256. A run uses it when it was built for the run's seed and recipe and
excluded every held-out prompt of the run that the warm start would train on (``shipped_for``);
its files are checked against the manifest first. Any other run trains its own once (~4.5 min
on one core) and caches it. Rebuild or check the shipped copy with::

    python -m scalerl.warmstart ship    # rewrite scalerl/assets/tiny-warm (~4.5 min, one core)
    python -m scalerl.warmstart check   # rebuild in a temp dir, compare with the shipped bytes

The bytes are reproducible on the same CPU kind and software (torch's CPU kernels pick their
instruction set at run time: AVX2, AVX-512 or AMX machines round matmuls differently, and so do
other torch versions), which is why the repository ships them instead of every machine
training its own: the start of the demo's curve is the same everywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# torch and scalerl.models (which imports torch) are imported inside the functions that train or
# sample: the run flow imports this module for WarmStartSpec and training_rows (the warm model's
# cache key), and the flow process does not import torch.
from scalerl.rewards.synthetic import ArithmeticScorer, make_arithmetic

if TYPE_CHECKING:
    import torch

# Offset of the warm-start data seed from the run's seed: warm-start prompts are a different
# draw from the distribution of task_rows(seed=run seed).
DATA_SEED_OFFSET = 7_919

SHIPPED_DIR = Path(__file__).resolve().parent / "assets" / "tiny-warm"
"""The shipped builtin:tiny-warm of the tiny-cpu preset (model files + manifest.json)."""
MANIFEST = "manifest.json"


class ShippedWeightsError(ValueError):
    """The shipped warm weights do not match their manifest (edited, truncated, corrupted)."""


@dataclass(frozen=True)
class WarmStartSpec:
    """How long and how hard the tiny model is pre-trained."""

    steps: int = 2_500
    """Optimizer steps; with label_smoothing, the knobs that set the starting pass rate (~4.5 min
    on one CPU core: greedy pass rate ~0.36, sampled at temperature 1 ~0.10)."""
    batch_size: int = 128
    """Sequences per step."""
    lr: float = 3e-3
    """Peak AdamW learning rate (cosine decay to 10% after a 5% warmup)."""
    hidden_size: int = 128
    layers: int = 2
    heads: int = 2
    num_prompts: int = 8_000
    """Distinct training prompts drawn (cycled through if steps x batch_size is larger)."""
    terms: tuple[int, int] = (2, 2)
    """Operands per training problem (synthetic:arithmetic's prompts have 2-3)."""
    digits: tuple[int, int] = (1, 2)
    """Digits per operand of the training problems (synthetic:arithmetic's have 2-3)."""
    ops: str = "+-"
    """Operators of the training problems (synthetic:arithmetic's also multiply)."""
    label_smoothing: float = 0.3
    """Cross-entropy label smoothing: keeps the sampling distribution diffuse (a pass rate at
    temperature 1 well below the greedy one), the gap RL closes by sharpening it."""
    reversed_thinking: bool = True
    """Completion "<think>" + answer digits reversed + "</think>" + answer: small transformers
    learn addition least-significant digit first far faster (the carry flows forward). Greedy
    held-out pass rate after 2,500 steps: 0.98 with it, ~0.36 with the bare answer."""


def training_rows(
    *, seed: int, spec: WarmStartSpec, exclude: Iterable[str] = ()
) -> list[dict[str, str]]:
    """The warm-start's arithmetic problems: their own seed, minus the ``exclude`` prompts."""
    held_out = set(exclude)
    rows = make_arithmetic(
        spec.num_prompts,
        seed=seed + DATA_SEED_OFFSET,
        digits=spec.digits,
        terms=spec.terms,
        ops=spec.ops,
    )
    return [r for r in rows if r["prompt"] not in held_out]


def completion_text(answer: str, reversed_thinking: bool = False) -> str:
    """The completion the warm start teaches for a reference answer (EOS follows it)."""
    from scalerl.models import THINK_END, THINK_START

    if not reversed_thinking:
        return answer
    sign = "-" if answer.startswith("-") else ""
    return f"{THINK_START}{answer.lstrip('-')[::-1]}{sign}{THINK_END}{answer}"


def task_rows(n: int, *, seed: int, spec: WarmStartSpec | None = None) -> list[dict[str, str]]:
    """n prompt rows (prompt, answer) from the warm start's own distribution, for a run's data
    file (data.source=file.jsonl, data.task=arithmetic): the task the warm model is in range on."""
    spec = spec or WarmStartSpec()
    rows = make_arithmetic(n, seed=seed, digits=spec.digits, terms=spec.terms, ops=spec.ops)
    return [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows]


def _examples(
    tokenizer, rows: Sequence[dict], eos: int, reversed_thinking: bool = False
) -> list[tuple[list[int], int]]:
    """(token ids of prompt + completion + EOS, index of the first completion token) per row."""
    prompts = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    texts = [completion_text(r["answer"], reversed_thinking) for r in rows]
    answers = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [(p + a + [eos], len(p)) for p, a in zip(prompts, answers, strict=True)]


def _batch(
    examples: Sequence[tuple[list[int], int]], pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention mask, labels) with -100 outside the answer tokens."""
    import torch

    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(examples), T), dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)  # (B, T)
    for i, (seq, start) in enumerate(examples):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, start : len(seq)] = torch.tensor(seq[start:])
    return ids, mask, labels


def warm_start_tiny(
    path: str | Path,
    *,
    seed: int = 0,
    spec: WarmStartSpec | None = None,
    exclude: Iterable[str] = (),
    log=None,
) -> Path:
    """Build the tiny model at ``path``, pre-train it on arithmetic, save it there; return path."""
    import torch

    from scalerl.models import build_tiny_model, load_policy

    spec = spec or WarmStartSpec()
    if spec.steps < 0:
        raise ValueError(f"steps must be >= 0, got {spec.steps}. Fix: pass steps=0 or more.")
    path = build_tiny_model(
        path, seed=seed, hidden_size=spec.hidden_size, layers=spec.layers, heads=spec.heads
    )
    model, tokenizer = load_policy(str(path), dtype="float32")
    rows = training_rows(seed=seed, spec=spec, exclude=exclude)
    examples = _examples(tokenizer, rows, tokenizer.eos_token_id, spec.reversed_thinking)
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    # One thread: a fixed reduction order (same bytes on every run), and on a shared 2-core
    # machine it is faster than two threads that spin-wait on each other.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        _train(model, examples, spec, seed, tokenizer.pad_token_id, log)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    model.eval().save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _train(model, examples, spec: WarmStartSpec, seed: int, pad: int, log=None) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    warmup = max(1, spec.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, spec.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    order = torch.randperm(len(examples), generator=gen).tolist()
    for step in range(spec.steps):
        start = (step * spec.batch_size) % len(order)
        picked = [examples[order[(start + j) % len(order)]] for j in range(spec.batch_size)]
        ids, mask, labels = _batch(picked, pad)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            label_smoothing=spec.label_smoothing,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if log is not None and (step % 100 == 0 or step == spec.steps - 1):
            log(step, loss.item())
    model.eval()


def sample_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    samples: int,
    temperature: float,
    seed: int,
    max_new_tokens: int = 20,
) -> list[list[str]]:
    """``samples`` completions per prompt, decoded (temperature 0 = greedy). A short, plain
    sampler for checking a warm start; the pipeline's engines do the real generation."""
    import torch

    with torch.no_grad():
        return _sample(model, tokenizer, prompts, samples, temperature, seed, max_new_tokens)


def _sample(model, tokenizer, prompts, samples, temperature, seed, max_new_tokens):
    import torch

    gen = torch.Generator().manual_seed(seed)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out: list[list[str]] = []
    for prompt in prompts:
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        ids = torch.tensor([prompt_ids] * samples)  # (G, P)
        done = torch.zeros(samples, dtype=torch.bool)
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids).logits[:, -1].float()  # (G, V)
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            done |= nxt == eos
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if bool(done.all()):
                break
        texts = []
        for row in ids[:, len(prompt_ids) :].tolist():
            row = row[: row.index(eos)] if eos in row else row
            texts.append(tokenizer.decode([t for t in row if t != pad]))
        out.append(texts)
    return out


def pass_rate(
    path: str | Path,
    rows: Sequence[dict],
    *,
    samples: int = 4,
    temperature: float = 1.0,
    seed: int = 0,
) -> float:
    """Mean arithmetic-scorer pass rate of the model at ``path`` over rows x samples."""
    from scalerl.models import load_policy

    model, tokenizer = load_policy(str(path), dtype="float32")
    scorer = ArithmeticScorer()
    completions = sample_answers(
        model,
        tokenizer,
        [r["prompt"] for r in rows],
        samples=samples,
        temperature=temperature,
        seed=seed,
    )
    passed = [
        scorer.score(r, c).passed for r, cs in zip(rows, completions, strict=True) for c in cs
    ]
    return sum(passed) / len(passed)


# ------------------------------------------------------------------------ shipped weights
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _spec_json(spec: WarmStartSpec) -> dict:
    return json.loads(json.dumps(asdict(spec)))  # tuples as lists, as the manifest holds them


def shipped_for(
    seed: int, spec: WarmStartSpec, overlap: Iterable[str], root: Path | None = None
) -> Path | None:
    """The shipped warm model's directory if it was built for these inputs, else None.

    It applies when it was built with this seed and recipe and it excluded every prompt in
    ``overlap`` (the run's held-out prompts that the warm start would train on): then it never
    saw one of them. (It is not the same model as one built for this run: it also skipped
    the shipped set's other excluded prompts.) Every file the manifest lists is checked against
    its sha256 first; a mismatch or an unreadable manifest raises ShippedWeightsError naming
    the file and the fix.
    """
    root = SHIPPED_DIR if root is None else Path(root)
    manifest = read_manifest(root)
    if manifest is None:
        return None
    if manifest["seed"] != seed or manifest["spec"] != _spec_json(spec):
        return None
    if not set(overlap) <= set(manifest["excluded"]):
        return None
    for name, digest in manifest["files"].items():
        path = root / name
        got = _sha256(path) if path.is_file() else "missing"
        if got != digest:
            raise ShippedWeightsError(
                f"the shipped builtin:tiny-warm file {path} does not match its manifest "
                f"(sha256 {got[:16]}, recorded {digest[:16]}). {_RESTORE.format(root=root)}"
            )
    return root


_RESTORE = (
    "Fix: restore it (`git checkout -- {root}` in a clone, or reinstall the package), or "
    "rebuild it on this machine with `python -m scalerl.warmstart ship` (rewrites the manifest)."
)
_MANIFEST_KEYS = ("seed", "spec", "excluded", "files")


def read_manifest(root: Path) -> dict | None:
    """The shipped manifest at ``root``, None when there is none; ShippedWeightsError when it
    cannot be read or lacks a field."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShippedWeightsError(
            f"the shipped builtin:tiny-warm manifest {path} cannot be read ({exc}). "
            f"{_RESTORE.format(root=root)}"
        ) from None
    missing = [k for k in _MANIFEST_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise ShippedWeightsError(
            f"the shipped builtin:tiny-warm manifest {path} lacks {', '.join(missing)}. "
            f"{_RESTORE.format(root=root)}"
        )
    return manifest


def preset_inputs() -> tuple[int, WarmStartSpec, list[str]]:
    """(seed, spec, excluded prompts) of the tiny-cpu preset's warm model: its held-out prompts
    that the warm start would otherwise train on."""
    from scalerl.config import load_config
    from scalerl.data import load_prompts

    config = load_config(preset="tiny-cpu")
    seed, spec = config.data.seed, WarmStartSpec()
    trained_on = {r["prompt"] for r in training_rows(seed=seed, spec=spec)}
    held_out = {r["prompt"] for r in load_prompts(config.data).eval}
    return seed, spec, sorted(trained_on & held_out)


def build_shipped(out: Path, log=None) -> dict:
    """Train the tiny-cpu preset's warm model into ``out`` and write its manifest; return it."""
    import platform

    import torch
    import transformers

    seed, spec, excluded = preset_inputs()
    warm_start_tiny(out, seed=seed, spec=spec, exclude=excluded, log=log)
    files = sorted(p.name for p in Path(out).iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {
        "what": "builtin:tiny-warm for the tiny-cpu preset (scalerl/warmstart.py)",
        "command": "python -m scalerl.warmstart ship",
        "seed": seed,
        "spec": _spec_json(spec),
        "excluded": excluded,
        "files": {name: _sha256(Path(out) / name) for name in files},
        "built_with": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpu": _cpu_name(),
            "machine": platform.machine(),
        },
    }
    (Path(out) / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def compare_with_shipped(rebuilt: Path, root: Path | None = None) -> dict:
    """How a rebuilt warm model differs from the shipped one: per file equal or not, and for
    the weights the largest absolute difference per tensor."""
    from safetensors.numpy import load_file

    root = SHIPPED_DIR if root is None else Path(root)
    shipped = json.loads((root / MANIFEST).read_text())
    rebuilt_manifest = json.loads((Path(rebuilt) / MANIFEST).read_text())
    same = {
        name: rebuilt_manifest["files"].get(name) == digest
        for name, digest in shipped["files"].items()
    }
    a, b = load_file(root / "model.safetensors"), load_file(Path(rebuilt) / "model.safetensors")
    diffs = {k: float(abs(a[k] - b[k]).max()) for k in sorted(a) if k in b}
    return {
        "same_bytes": all(same.values()),
        "files": same,
        "max_abs_weight_diff": max(diffs.values(), default=0.0),
        "tensors_differing": sum(d > 0 for d in diffs.values()),
        "tensors": len(diffs),
        "shipped_built_with": shipped["built_with"],
        "rebuilt_with": rebuilt_manifest["built_with"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import os
    import shutil
    import sys
    import tempfile
    import time

    parser = argparse.ArgumentParser(
        prog="python -m scalerl.warmstart",
        description="Build or check the shipped builtin:tiny-warm weights (scalerl/assets).",
    )
    parser.add_argument("action", choices=["ship", "check"])
    parser.add_argument("--out", type=Path, default=SHIPPED_DIR, help="where `ship` writes")
    args = parser.parse_args(argv)
    start = time.monotonic()

    def log(step: int, loss: float) -> None:
        print(f"step {step + 1}/{WarmStartSpec().steps} loss {loss:.3f} "
              f"({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip

    out = args.out.resolve()
    old = None
    if args.action == "ship" and out.is_dir() and any(out.iterdir()):
        try:
            old = read_manifest(out)
        except ShippedWeightsError:
            old = {"files": {}}  # a damaged manifest: its own files are replaced below
        if old is None:
            parser.error(
                f"--out {out} is a folder with files but no {MANIFEST}: not a shipped warm model. "
                "Fix: give an empty or new folder, or the shipped one."
            )
    with tempfile.TemporaryDirectory(prefix="scalerl-warm-") as tmp:
        built = Path(tmp) / "m"
        manifest = build_shipped(built, log=log)
        if args.action == "check":
            report = compare_with_shipped(built)
            print(json.dumps(report, indent=1))
            return 0 if report["same_bytes"] else 1
        out.mkdir(parents=True, exist_ok=True)
        staged = out / f".{MANIFEST}.new"  # the manifest goes last: files first, then their list
        for name in manifest["files"]:
            shutil.copy2(built / name, out / f".{name}.new")
            os.replace(out / f".{name}.new", out / name)
        for name in (old or {}).get("files", {}):
            if name not in manifest["files"]:
                (out / name).unlink(missing_ok=True)  # only what the old manifest listed
        shutil.copy2(built / MANIFEST, staged)
        os.replace(staged, out / MANIFEST)
    print(json.dumps({"wrote": str(out), "files": manifest["files"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
