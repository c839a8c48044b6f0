"""Policy models: a deterministic tiny model for tests/demos, and the loader for real ones.

Usage::

    path = build_tiny_model(tmp_dir / "tiny", seed=0)      # Qwen2-shaped, character tokenizer
    model, tokenizer = load_policy(str(path))              # or a hub id such as "Qwen/Qwen3-0.6B"

The tiny model exists because nothing can be downloaded here: tests, CI and the CPU demo
need a real causal LM that transformers and vLLM both load. It is a Qwen2 architecture with
random weights drawn from ``seed`` (same seed -> byte-identical safetensors) and a
character-level tokenizer: every ASCII character is one token (any other character one token
per UTF-8 byte), plus single tokens for the end of sequence, ``<think>``, ``</think>`` and
padding.
``head_dim`` is 64 because vLLM's CPU attention rejects 16, and ``max_position_embeddings``
must cover prompt + completion (RoPE past it gives NaN logprobs in vLLM).

``load_policy`` is the one loading path for hub ids and local directories; it turns the
usual failure modes into a ``ModelLoadError`` that names the problem and the fix.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from tokenizers import AddedToken

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
THINK_START = "<think>"
THINK_END = "</think>"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Heads that make an architecture a next-token predictor; anything else (BertModel,
# BertForMaskedLM, ...) cannot generate.
_CAUSAL_ARCH_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


class ModelLoadError(ValueError):
    """A policy model or tokenizer cannot be used; the message says why and how to fix it."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of byte-level BPE vocabularies."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def tiny_vocab() -> dict[str, int]:
    """The tiny tokenizer's vocabulary: the special tokens, then one token per byte."""
    vocab = {tok: i for i, tok in enumerate((EOS_TOKEN, PAD_TOKEN, THINK_START, THINK_END))}
    for byte in range(256):
        vocab[_bytes_to_unicode()[byte]] = len(vocab)
    return vocab


def build_tiny_tokenizer():
    """A character-level (byte-level BPE without merges) Qwen2 tokenizer.

    transformers routes every ``qwen2`` model to ``Qwen2Tokenizer`` whatever the saved class
    says, so the tiny tokenizer *is* a Qwen2Tokenizer: its regex + byte-level pre-tokenizer
    with an empty merge list maps each ASCII character to one token (non-ASCII characters to
    one token per UTF-8 byte), and AutoTokenizer and vLLM load it back unchanged.
    """
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer(
        vocab=tiny_vocab(), merges=[], eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, unk_token=None
    )
    # The think markers are text that the verifier and the length controller must see in
    # decoded output, so they are single added tokens that are not "special" (not skipped).
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in (THINK_START, THINK_END)]
    )
    return tokenizer


def build_tiny_model(
    path: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 128,
    layers: int = 2,
    heads: int = 2,
    max_position_embeddings: int = 4096,  # scalerl.prompts.BUILTIN_MAX_POSITIONS
    intermediate_size: int | None = None,
    kv_heads: int | None = None,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = True,
) -> Path:
    """Write a random Qwen2 causal LM + character tokenizer to ``path``; return the path.

    Deterministic: the same arguments give byte-identical ``model.safetensors``.
    ``vocab_size`` above the tokenizer's size pads the embedding (for real-model shapes,
    e.g. Qwen2-0.5B's 151,936 in benchmarks); padded ids decode to nothing.
    """
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if hidden_size % heads:
        raise ValueError(
            f"hidden_size {hidden_size} is not divisible by heads {heads}. "
            "Fix: choose heads so that hidden_size / heads is an integer (64 works with vLLM CPU)."
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise ValueError(
            f"vocab_size {vocab_size} < {len(tokenizer)} tokenizer tokens. Fix: leave it None."
        )
    config = Qwen2Config(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        head_dim=hidden_size // heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


QWEN3_VOCAB = 151_936  # the Qwen3 family's embedding rows (151,669 tokenizer tokens, padded)
QWEN3_THINK_END_ID = 151_668
_QWEN3_ASSET = Path(__file__).parent / "assets" / "qwen3-tokenizer"


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def qwen3_tokenizer_dir(cache: str | Path | None = None) -> Path:
    """A folder with Qwen3's real tokenizer and chat template (the vendored copy in
    scalerl/assets/qwen3-tokenizer, tokenizer.json gunzipped once into the cache: $SCALERL_CACHE,
    else ~/.cache/scalerl, or `cache`). Both files are checked against SHA256SUMS; a damaged
    copy raises ModelLoadError."""
    import gzip
    import os
    import shutil
    import tempfile

    sums = dict(
        reversed(line.split()) for line in (_QWEN3_ASSET / "SHA256SUMS").read_text().splitlines()
    )
    root = Path(cache or os.environ.get("SCALERL_CACHE") or Path.home() / ".cache" / "scalerl")
    out = root / f"qwen3-tokenizer-{sums['tokenizer.json'][:12]}"
    if all((out / n).is_file() for n in sums):
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".qwen3-tok-", dir=root))
    try:
        with (
            gzip.open(_QWEN3_ASSET / "tokenizer.json.gz", "rb") as src,
            (tmp / "tokenizer.json").open("wb") as dst,
        ):
            shutil.copyfileobj(src, dst)
        shutil.copy(_QWEN3_ASSET / "tokenizer_config.json", tmp / "tokenizer_config.json")
        for name, want in sums.items():
            if _sha256(tmp / name) != want:
                raise ModelLoadError(
                    f"the vendored Qwen3 {name} does not match its SHA256SUMS entry. Fix: restore "
                    "scalerl/assets/qwen3-tokenizer from the repository (git checkout -- it)."
                )
        try:
            tmp.rename(out)  # atomic: a concurrent unpack of the same files loses the race
        except OSError:
            if not all((out / n).is_file() for n in sums):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_qwen3_model(
    path: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 1,
    kv_heads: int = 1,
    head_dim: int = 64,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 4096,
    tie_word_embeddings: bool = True,
) -> Path:
    """Write a small random Qwen3-architecture causal LM with the real Qwen3 vocabulary
    (151,936 embedding rows) and the vendored Qwen3 tokenizer + chat template; return the path.
    What a real reasoning model looks like to the pipeline (its tokenizer, template, special
    tokens, eos ids and vocabulary size), at a size a CPU runs: 2 layers of width 64 hold
    ~10M parameters, nearly all in the embedding. Deterministic for the same arguments.
    ``head_dim`` stays 64: vLLM's CPU attention rejects smaller heads."""
    import shutil

    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok_dir = qwen3_tokenizer_dir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, path / name)
    eos, pad = 151_645, 151_643  # <|im_end|>, <|endoftext|>
    config = Qwen3Config(
        vocab_size=QWEN3_VOCAB,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 3 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=pad,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    # Qwen3 stops on <|im_end|> and <|endoftext|> (its published generation_config.json)
    model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad)
    model.save_pretrained(path, safe_serialization=True)
    return path


def check_tokenizer_fits(tokenizer, model_config, name_or_path: str) -> None:
    """Raise ModelLoadError when the tokenizer can emit ids the model has no embedding row for
    (a tokenizer from another model family, or one with tokens added after the model was
    saved): those ids would index past the embedding on the first prompt."""
    rows = getattr(model_config, "vocab_size", None)
    if rows is None and hasattr(model_config, "get_text_config"):
        rows = getattr(model_config.get_text_config(), "vocab_size", None)
    size = len(tokenizer)
    if rows is not None and size > rows:
        raise ModelLoadError(
            f"the tokenizer of {name_or_path} has {size:,} tokens but the model has only "
            f"{rows:,} embedding rows, so token ids {rows:,}..{size - 1:,} have no embedding. Fix: "
            "use the tokenizer saved with this model (or resize the model's embeddings with "
            "model.resize_token_embeddings(len(tokenizer)) and save both)."
        )


def _looks_local(name_or_path: str) -> bool:
    return name_or_path.startswith(("/", "./", "../", "~")) or Path(name_or_path).exists()


def check_causal_lm_config(config, name_or_path: str) -> None:
    """Raise ModelLoadError unless ``config`` describes a decoder that can generate text."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", "?")
    not_causal = (
        (archs and not any(a.endswith(_CAUSAL_ARCH_SUFFIXES) for a in archs))
        or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        # BERT-family configs register a causal head but are encoders unless is_decoder.
        or getattr(config, "is_decoder", None) is False
    )
    if not_causal:
        raise ModelLoadError(
            f"model {name_or_path} is not a causal language model (model_type={model_type}, "
            f"architectures={archs or None}). Fix: pass a decoder-only causal LM checkpoint "
            "(e.g. a Qwen2/Qwen3/Llama *ForCausalLM)."
        )


def load_tokenizer(name_or_path: str, revision: str | None = None):
    """AutoTokenizer for ``name_or_path``; ModelLoadError if it has no end-of-sequence token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load a tokenizer from {name_or_path}: {type(e).__name__}. "
            "Fix: make sure the directory (or hub repo) contains tokenizer.json / tokenizer_config.json."
        ) from e
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(
            f"tokenizer of {name_or_path} has no end-of-sequence token, so completions could "
            "never stop. Fix: set eos_token in tokenizer_config.json (or save the tokenizer "
            "with eos_token=...)."
        )
    return tokenizer


# from_pretrained builds the model under a process-wide meta-device context: two threads loading
# at once (generator, trainer and evaluator share a process under Prefect's thread pool) leave one
# with meta tensors ("Cannot copy out of meta tensor"). Loads are serialized.
_LOAD_LOCK = threading.Lock()


_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _check_local_dir(local: Path) -> None:
    if not (local / "config.json").is_file():
        what = "does not exist" if not local.exists() else "has no config.json"
        raise ModelLoadError(
            f"model path {local} {what}. Fix: pass a local directory containing "
            "config.json and weights (e.g. from build_tiny_model or save_pretrained) or a hub id."
        )


def _load_config(name_or_path: str, revision: str | None = None):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load a model config for {name_or_path}: {type(e).__name__}. Fix: pass an "
            "existing local directory or a hub id reachable from this machine (HF_HUB_OFFLINE "
            "and HF_HOME decide where hub ids are looked up)."
        ) from e


def _safetensors_shapes(local: Path) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (file, shape) from the safetensors headers of a local model (the 8-byte
    length and the JSON header of each file: no tensor is read). {} for pytorch_model.bin."""
    import json

    index = local / "model.safetensors.index.json"
    if (local / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelLoadError(
                f"{index} is not a safetensors index (no weight_map). Fix: save the model again "
                "with model.save_pretrained(path)."
            ) from None
    else:
        return {}
    shapes = {}
    for name in files:
        path = local / name
        try:
            with path.open("rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                if not 2 <= size <= 100 << 20:
                    raise ValueError(f"header length {size}")
                header = json.loads(fh.read(size))
            shapes |= {
                k: (name, list(v["shape"])) for k, v in header.items() if k != "__metadata__"
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(
                f"the weights file {path} is not a readable safetensors file ({type(e).__name__}: "
                f"{str(e)[:80]}). Fix: copy or save the model again (model.save_pretrained(path))."
            ) from None
    return shapes


def check_weight_shapes(local: Path, config) -> None:
    """Raise ModelLoadError when the weights' tensor shapes are not what config.json builds (a
    config.json from another model, or edited: vocab_size, hidden_size, layer widths), before
    from_pretrained fails on it after loading. Compares the safetensors headers with the shapes
    of the model config.json describes, built on the meta device (no memory, no weights)."""
    shapes = _safetensors_shapes(local)
    if not shapes:
        return
    import warnings

    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
    expected = {k: list(t.shape) for k, t in model.state_dict().items()}
    bad = [(k, f, shape) for k, (f, shape) in shapes.items() if expected.get(k, shape) != shape]
    if bad:
        key, file, shape = bad[0]
        fields = ", ".join(
            f"{f} {getattr(config, f)}"
            for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
            if getattr(config, f, None) is not None
        )
        raise ModelLoadError(
            f"the weights of {local} do not fit its config.json: {key} is {shape} in {file} but "
            f"config.json ({fields}) makes it {expected[key]} ({len(bad)} tensor(s) differ). Fix: "
            "use the config.json saved with these weights (model.save_pretrained(path) writes "
            "both), or weights saved from this config."
        )


def check_model(name_or_path: str, *, with_config: bool = False):
    """Check a local model directory without loading its weights: config.json present, a causal
    LM, weight files present whose tensor shapes are what config.json builds, a tokenizer with an
    end-of-sequence token and no more tokens than the model has embedding rows. Raises
    ModelLoadError naming the problem and the fix; returns the checked tokenizer (with
    `with_config`: the tokenizer and the loaded config), or None without checking a hub id (that
    needs the network, so it is checked when the run loads it)."""
    name_or_path = str(name_or_path)
    if not _looks_local(name_or_path):
        return None
    local = Path(name_or_path).expanduser()
    _check_local_dir(local)
    config = _load_config(str(local))
    check_causal_lm_config(config, str(local))
    if not any((local / f).is_file() for f in _WEIGHT_FILES):
        raise ModelLoadError(
            f"model path {local} has config.json but no weights ({' or '.join(_WEIGHT_FILES[::2])}). "
            "Fix: save the model there with model.save_pretrained(path)."
        )
    check_weight_shapes(local, config)
    tokenizer = load_tokenizer(str(local))
    check_tokenizer_fits(tokenizer, config, str(local))
    return (tokenizer, config) if with_config else tokenizer


def load_policy(
    name_or_path: str, *, dtype: str = "float32", device: str = "cpu", revision: str | None = None
):
    """Load ``(model, tokenizer)`` from a hub id (at ``revision``, default the main branch) or a
    local directory, in eval mode. Hub code is never run (no trust_remote_code): the policy must
    be an architecture transformers (and vLLM) implement.

    Raises ModelLoadError for a missing path, an unknown dtype, a model that is not a causal
    LM, or a tokenizer without an end-of-sequence token.
    """
    from transformers import AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}. Fix: use one of {sorted(_DTYPES)}.")
    name_or_path = str(name_or_path)
    if _looks_local(name_or_path):
        _check_local_dir(Path(name_or_path).expanduser())
        name_or_path = str(Path(name_or_path).expanduser())
    check_causal_lm_config(_load_config(name_or_path, revision), name_or_path)
    tokenizer = load_tokenizer(name_or_path, revision)
    with _LOAD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=_DTYPES[dtype], revision=revision
        )
    return model.to(device).eval(), tokenizer


def state_misfit(
    params: dict, tensors: dict, *, optional=frozenset(), extra_ok=frozenset(), shown: int = 3
) -> str | None:
    """How `tensors` fail to fit `params` (both by name): "missing [...], unexpected [...],
    wrong shape [...]" (at most `shown` names each), None when they fit. optional: names of
    params that may be absent; extra_ok: names of tensors that may have no param."""
    missing = sorted(set(params) - set(tensors) - set(optional))
    extra = sorted(set(tensors) - set(params) - set(extra_ok))
    bad = [n for n in params if n in tensors and tensors[n].shape != params[n].shape]
    if not (missing or extra or bad):
        return None
    return f"missing {missing[:shown]}, unexpected {extra[:shown]}, wrong shape {bad[:shown]}"


def copy_present(params: dict, tensors: dict) -> None:
    """Copy each tensor into the param of its name, in place (no reallocation)."""
    with torch.no_grad():
        for name, p in params.items():
            if name in tensors:
                p.copy_(tensors[name])


def map_tensors(state: dict, fn) -> dict:
    """`fn` applied once per distinct tensor of a state dict, keeping its aliasing: tied
    tensors (an LM head sharing the embedding) stay one tensor, so save_pretrained writes them
    once, as from the live model."""
    done: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, t in state.items():
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key not in done:
            done[key] = fn(t)
        out[name] = done[key]
    return out


def torch_dtype(dtype: str) -> torch.dtype:
    """Map a dtype name ("float32", "bfloat16", "float16") to a torch dtype."""
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}. Fix: use one of {sorted(_DTYPES)}.")
    return _DTYPES[dtype]
