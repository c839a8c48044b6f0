"""docs/BAD_INPUT.md, row by row: each documented bad input is run through the `scalerl` CLI
exactly as the row's command is written, and must print exactly the row's message on stderr
(one line), nothing on stdout, exit with code 2, and leave every file it could touch as it was
(the inputs, the committed runs, the default ./runs, the S3 prefix). The table is the only
list of cases: a row added to the doc is tested, and a changed message fails until the doc
says the same.

Placeholders in commands and messages: $TMP (this module's temporary directory; commands run
with $TMP/work as the current directory), $S3 (the session's moto_server endpoint) and $DEAD
(an endpoint nothing listens on). Leading VAR=value words of a command are its environment;
otherwise no AWS credentials are set at all.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

# tests/storage (a directory without __init__.py) is a namespace package named `storage` for a
# module in tests/ that pytest runs on its own; with the repository root anywhere on sys.path
# the real package wins (a regular package beats a namespace portion).
sys.path.append(str(Path(__file__).resolve().parents[1]))

from flows.cli import app  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "BAD_INPUT.md"
SCRIPT = Path(sys.executable).parent / "scalerl"
S3_PREFIX = "scalerl-test/bad-input"
# Root bypasses file modes. As root these rows run the console script under setpriv without
# the two capabilities that do the bypassing (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH).
NEEDS_NON_ROOT = {"storage-no-permission", "storage-read-only", "storage-runs-ls-no-permission"}
NO_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
# What the issue asks the catalogue to cover at least.
REQUIRED = {
    "config-negative-k",
    "config-eps-max-zero",
    "config-batch-not-divide",
    "config-unknown-loss",
    "config-window-outside-budget",
    "config-unknown-key",
    "config-credentials-in-config",
    "data-missing-column-jsonl",
    "data-missing-column-parquet",
    "data-empty-prompt",
    "data-non-utf8-jsonl",
    "data-non-utf8-parquet",
    "data-duplicate-ids",
    "data-empty-jsonl",
    "data-empty-parquet",
    "model-missing-path",
    "model-not-causal",
    "model-no-eos",
    "storage-bad-scheme",
    "storage-missing-credentials",
    "storage-no-permission",
    "storage-read-only",
    "storage-foreign-commit-file",
    "config-budget-below-window",
    "config-tiny-warm-other-data",
    "config-tiny-warm-run-writes-nothing",
    "data-null-prompt-id",
    "data-float-answer-not-integer",
    "data-nul-in-answer",
    "data-unclosed-boxed-answer",
}


@dataclass(frozen=True)
class Row:
    id: str
    what: str
    command: str
    message: str


def _cell(text: str) -> str:
    text = text.strip().replace("\\|", "|")
    if text.startswith("``") and text.endswith("``"):
        return text[2:-2].strip()
    if text.startswith("`") and text.endswith("`"):
        return text[1:-1]
    return text


def catalogue() -> list[Row]:
    """The rows of every table in docs/BAD_INPUT.md whose first cell is a backticked id."""
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if not line.startswith("| `"):
            continue
        cells = [_cell(c) for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        assert len(cells) == 4, f"docs/BAD_INPUT.md row needs 4 cells: {line}"
        rows.append(Row(*cells))
    return rows


ROWS = catalogue()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its type, size, mtime and mode: any write shows up."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def _record(run_id: str, i: int) -> dict:
    import datetime as dt

    t0 = dt.datetime(2026, 11, 25, tzinfo=dt.UTC)
    return {
        "run_id": run_id,
        "shard_id": "gen0-000001",
        "prompt_id": f"p{i}",
        "group_id": f"g{i}",
        "sample_index": 0,
        "task": "arithmetic",
        "prompt": f"{i} + 1 =",
        "prompt_token_ids": [1, 2],
        "answer": str(i + 1),
        "completion": str(i + 1),
        "completion_token_ids": [3],
        "logprobs": [-0.5],
        "versions": [0],
        "finish_reason": "stop",
        "thinking_tokens": 0,
        "answer_tokens": 1,
        "generator_id": "gen0",
        "started_at": t0,
        "finished_at": t0,
    }


def _committed_run(store, run_id: str):
    from scalerl.config import load_config
    from storage import rollouts_from_records

    run = store.run(run_id, create=True)
    run.write_config(load_config(preset="tiny-cpu").model_dump(mode="json"))
    run.commit_shard("raw", "gen0-000001", rollouts_from_records([_record(run_id, 0)]))
    return run


def build_inputs(tmp: Path) -> None:
    """Every bad input of the catalogue under $TMP (files, models, stores)."""
    from transformers import BertConfig

    from scalerl.models import build_qwen3_model, build_tiny_model, qwen3_tokenizer_dir
    from storage import open_store

    inp, work = tmp / "in", tmp / "work"
    inp.mkdir()
    work.mkdir()
    # -- config --
    (inp / "typo.yaml").write_text("trainer:\n  checkpoint_evry: 5\n")
    (inp / "broken.yaml").write_text("generation: [unclosed\n")
    # -- data --
    (inp / "no_prompt_column.jsonl").write_text('{"question": "1 + 1 =", "answer": "2"}\n')
    pq.write_table(
        pa.table({"question": ["1 + 1 ="], "answer": ["2"]}), inp / "no_prompt_column.parquet"
    )
    (inp / "empty_prompt.jsonl").write_text(
        '{"prompt": "1 + 1 =", "answer": "2"}\n{"prompt": "  ", "answer": "3"}\n'
    )
    (inp / "latin1.jsonl").write_bytes(
        '{"prompt": "caf\xe9 + 1 =", "answer": "2"}\n'.encode("latin-1")
    )
    (inp / "lone_surrogate.jsonl").write_text('{"prompt": "\\udcff + 1 =", "answer": "2"}\n')
    pq.write_table(
        pa.table({"prompt": pa.array([b"caf\xe9 + 1 ="], pa.binary()), "answer": ["2"]}),
        inp / "latin1.parquet",
    )
    (inp / "duplicate_ids.jsonl").write_text(
        "".join(json.dumps({"id": i, "prompt": f"{i} + 1 =", "answer": "1"}) + "\n" for i in "abca")
    )
    (inp / "empty.jsonl").write_bytes(b"")
    (inp / "empty.parquet").write_bytes(b"")
    pq.write_table(
        pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())}),
        inp / "no_rows.parquet",
    )
    (inp / "not_json.jsonl").write_text('{"prompt": "1 + 1 =", "answer": "2"}\nprompt: 2 + 2 =\n')
    (inp / "three_rows.jsonl").write_text(
        "".join(json.dumps({"prompt": f"{i} + 1 =", "answer": str(i + 1)}) + "\n" for i in range(3))
    )
    (inp / "prompts.csv").write_text("prompt,answer\n1 + 1 =,2\n")
    (inp / "null_ids.jsonl").write_text(
        "".join(
            json.dumps({"id": i, "prompt": f"{n} + 1 =", "answer": "1"}) + "\n"
            for n, i in enumerate(["a", None, None])
        )
    )
    pq.write_table(  # what pandas writes for numbers: float64 answers
        pa.table({"prompt": ["1 + 1 =", "285 / 2 ="], "answer": pa.array([2.0, 142.5])}),
        inp / "float_answers.parquet",
    )
    (inp / "nul_answer.jsonl").write_text(
        json.dumps({"prompt": "1 + 1 =", "answer": "2"})
        + "\n"
        + json.dumps({"prompt": "2 + 2 =", "answer": "4\x00"})
        + "\n"
    )
    (inp / "unclosed_boxed.jsonl").write_text(
        json.dumps({"prompt": "1 + 1 =", "answer": "2"})
        + "\n"
        + json.dumps({"prompt": "1 / 2 =", "answer": "\\boxed{\\frac{1}{2}"})
        + "\n"
    )

    def chat_jsonl(name, chat):
        good = {"messages": [{"role": "user", "content": "1 + 1 ="}], "answer": "2"}
        (inp / name).write_text(
            json.dumps(good) + "\n" + json.dumps({"messages": chat, "answer": "3"}) + "\n"
        )

    chat_jsonl("chat_not_list.jsonl", "1 + 2 =")
    chat_jsonl("chat_no_content.jsonl", [{"role": "user"}])
    chat_jsonl("chat_unknown_role.jsonl", [{"role": "tool", "content": "1 + 2 ="}])
    chat_jsonl("chat_no_user.jsonl", [{"role": "system", "content": "Be brief."}])
    chat_jsonl("chat_empty_content.jsonl", [{"role": "user", "content": " "}])
    chat_jsonl(
        "chat_ends_with_assistant.jsonl",
        [{"role": "user", "content": "1 + 2 ="}, {"role": "assistant", "content": "3"}],
    )
    (inp / "chat.jinja").write_text(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    )
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "1 + 1 =", "reward_model": {"style": "rule", "gt": "2"}}]),
        inp / "struct_answer.parquet",
    )
    import datasets

    one = datasets.Dataset.from_list([{"prompt": "1 + 1 =", "answer": "2"}])
    datasets.DatasetDict({"train": one, "test": one}).save_to_disk(str(inp / "dataset_dict"))
    # -- models --
    BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=1).save_pretrained(
        inp / "bert"
    )
    tiny = build_tiny_model(tmp / "tiny", seed=0)
    no_eos = shutil.copytree(tiny, inp / "no_eos")
    tok_cfg = json.loads((no_eos / "tokenizer_config.json").read_text())
    tok_cfg["eos_token"] = None
    (no_eos / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    no_weights = shutil.copytree(tiny, inp / "no_weights")
    (no_weights / "model.safetensors").unlink()
    big_vocab = shutil.copytree(tiny, inp / "big_vocab")  # Qwen3's tokenizer on a 260-row model
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen3_tokenizer_dir() / name, big_vocab / name)
    vocab100 = shutil.copytree(tiny, inp / "vocab100")  # config.json not the weights' shapes
    cfg = json.loads((vocab100 / "config.json").read_text())
    (vocab100 / "config.json").write_text(json.dumps(cfg | {"vocab_size": 100}))
    cut60 = shutil.copytree(tiny, inp / "cut60")  # a tokenizer cut to its first 60 tokens
    tok = json.loads((cut60 / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {k: i for k, i in tok["model"]["vocab"].items() if i < 60}
    (cut60 / "tokenizer.json").write_text(json.dumps(tok))
    build_qwen3_model(inp / "qwen3", seed=0)
    # a GPT-2 (vLLM has no LoRA support for it) with the tiny tokenizer, positions to spare
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2Config(
        vocab_size=260, n_positions=4096, n_embd=64, n_layer=1, n_head=1, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    GPT2LMHeadModel(gpt2).save_pretrained(inp / "gpt2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, inp / "gpt2" / name)
    (inp / "broken.jinja").write_text("{% for m in messages %}{{ m.content }")
    # -- storage --
    (inp / "a_file").write_text("not a directory\n")
    (inp / "locked").mkdir()
    (inp / "read_only").mkdir()
    store = open_store(str(tmp / "store"))
    _committed_run(store, "good")
    foreign_commit = _committed_run(store, "foreign-commit")
    (tmp / "store" / "foreign-commit" / "shards" / "raw" / "commits" / "notes.txt").write_text("hi")
    _committed_run(store, "foreign-config")
    (tmp / "store" / "foreign-config" / "run.json").write_text("model: qwen\n")
    _committed_run(store, "foreign-weights")
    (tmp / "store" / "foreign-weights" / "weights").mkdir()
    (tmp / "store" / "foreign-weights" / "weights" / "old-model.bin").write_bytes(b"\0" * 8)
    (tmp / "store" / "not-a-run").mkdir()
    (tmp / "store" / "not-a-run" / "data.txt").write_text("someone else's files\n")
    assert foreign_commit.read_shard("raw", "gen0-000001").num_rows == 1
    os.chmod(inp / "locked", 0o000)
    os.chmod(inp / "read_only", 0o555)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """$TMP with every bad input of the catalogue; permissions restored afterwards."""
    tmp = tmp_path_factory.mktemp("bad-input")
    build_inputs(tmp)
    yield tmp
    inp = tmp / "in"
    os.chmod(inp / "locked", 0o700)
    os.chmod(inp / "read_only", 0o700)


def _expand(text: str, tmp: Path, s3: str, dead: str) -> str:
    return text.replace("$TMP", str(tmp)).replace("$S3", s3).replace("$DEAD", dead)


def _split(command: str) -> tuple[dict[str, str], list[str]]:
    """'A=1 B=2 scalerl x y' -> ({'A': '1', 'B': '2'}, ['x', 'y'])."""
    words = shlex.split(command)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    assert words and words[0] == "scalerl", f"a catalogue command must run scalerl: {command}"
    return env, words[1:]


def _base_env() -> dict[str, str | None]:
    """No AWS credentials, profile or endpoint from this machine; no Prefect server to reach."""
    env: dict[str, str | None] = {
        var: None
        for var in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_DEFAULT_PROFILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
            "SCALERL_STORAGE",
        )
    }
    env |= {
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        # a run that got past its checks would fail here instead of starting a server
        "PREFECT_API_URL": "http://127.0.0.1:9/api",
    }
    return env


def _s3_keys(endpoint: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(
        key="testing",
        secret="testing",
        client_kwargs={"endpoint_url": endpoint},
        skip_instance_cache=True,
    )
    return fs.find(S3_PREFIX)


def _param(row: Row):
    marks = [pytest.mark.integration] if "$S3" in row.command else []
    return pytest.param(row, id=row.id, marks=marks)


@pytest.fixture(scope="module")
def outcomes(inputs: Path, request) -> dict[str, dict]:
    """What every selected row did, run in ONE fresh interpreter (this file as a script, see
    _run_rows): the rows load models and tokenizers through the CLI, and the suite's process
    has by then run servers, engines and a browser; a native crash there (seen once in CI, a
    segfault with no Python frame) would end the whole suite instead of failing one row."""
    selected = {
        item.callspec.params["row"].id
        for item in request.session.items
        if item.module is not None
        and Path(str(item.module.__file__)) == Path(__file__)
        and "row" in getattr(getattr(item, "callspec", None), "params", {})
    }
    rows = [r for r in ROWS if r.id in selected and not _as_root_without_dac(r)]
    s3 = (
        request.getfixturevalue("moto_endpoint")
        if any("$S3" in r.command for r in rows)
        else "http://unused"
    )
    dead = f"http://127.0.0.1:{_closed_port()}"
    spec = inputs / "rows.json"
    out = inputs / "outcomes.json"
    spec.write_text(
        json.dumps({"tmp": str(inputs), "s3": s3, "dead": dead, "rows": [r.id for r in rows]})
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-X", "faulthandler", __file__, str(spec), str(out)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, f"the catalogue's process failed:\n{proc.stderr[-4000:]}"
        return {**json.loads(out.read_text()), "$S3": s3, "$DEAD": dead}
    finally:
        spec.unlink(missing_ok=True)
        out.unlink(missing_ok=True)


def _as_root_without_dac(row: Row) -> bool:
    return row.id in NEEDS_NON_ROOT and os.geteuid() == 0


@pytest.mark.parametrize("row", [_param(r) for r in ROWS])
def test_documented_message(row: Row, inputs: Path, outcomes: dict):
    if _as_root_without_dac(row):
        _run_without_dac_override(row, inputs)
        return
    got = outcomes[row.id]
    expected = _expand(row.message, inputs, outcomes["$S3"], outcomes["$DEAD"])
    assert got["exception"] is None, got["exception"]
    assert (got["exit_code"], got["stderr"], got["stdout"]) == (2, expected + "\n", "")
    assert not got["changed"], f"a rejected input changed or wrote files: {got['changed']}"
    if "$S3" in row.command:
        assert got["s3_keys"] == [], "a rejected input wrote to the bucket"


def _run_rows(spec_path: str, out_path: str) -> None:
    """The catalogue's process: each row through the CLI (typer's CliRunner, in this process),
    with the files it could touch compared before and after. Results as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    tmp, s3, dead = Path(spec["tmp"]), spec["s3"], spec["dead"]
    by_id = {r.id: r for r in ROWS}
    results = {}
    saved_env = dict(os.environ)
    for row_id in spec["rows"]:
        row = by_id[row_id]
        env, args = _split(_expand(row.command, tmp, s3, dead))
        os.chdir(tmp / "work")
        before = _snapshot(tmp)
        result = CliRunner().invoke(app, args, env=_base_env() | env)
        after = _snapshot(tmp)
        exc = result.exception
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        results[row_id] = {
            "exit_code": result.exit_code,
            "stderr": result.stderr,
            "stdout": result.stdout,
            "exception": None if exc is None or isinstance(exc, SystemExit) else repr(exc),
            "changed": [c for c in changed if c not in ("rows.json", "outcomes.json")],
            "s3_keys": _s3_keys(s3) if "$S3" in row.command else [],
        }
        os.environ.clear()
        os.environ.update(saved_env)
    Path(out_path).write_text(json.dumps(results))


def _full_env(extra: dict[str, str]) -> dict[str, str]:
    merged = {**os.environ, **_base_env(), **extra}
    return {k: v for k, v in merged.items() if v is not None}


def _run_without_dac_override(row: Row, inputs: Path) -> None:
    """The row through the installed script, as root that file modes apply to."""
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file modes cannot be enforced here")
    probe = subprocess.run([*NO_DAC, "ls", str(inputs / "in" / "locked")], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("running as root and setpriv could not drop CAP_DAC_OVERRIDE here")
    env, args = _split(_expand(row.command, inputs, "", ""))
    before = _snapshot(inputs)
    out = subprocess.run(
        [*NO_DAC, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=_full_env(env),
        cwd=inputs / "work",
    )
    expected = _expand(row.message, inputs, "", "")
    assert (out.returncode, out.stderr, out.stdout) == (2, expected + "\n", "")
    assert _snapshot(inputs) == before, "a rejected input changed or wrote files"


def test_committed_runs_are_still_readable(inputs):
    """Runs the catalogue damaged around (foreign files beside them) keep their committed data."""
    from storage import open_store

    store = open_store(str(inputs / "store"))
    for run_id in ("good", "foreign-commit", "foreign-config", "foreign-weights"):
        assert store.run(run_id).read_shard("raw", "gen0-000001").num_rows == 1


def test_catalogue_covers_what_the_issue_lists():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids)), "duplicate ids in docs/BAD_INPUT.md"
    assert set(ids) >= REQUIRED, f"missing rows: {sorted(REQUIRED - set(ids))}"
    for row in ROWS:
        assert row.message.startswith("error: ") and "\n" not in row.message, row.id
        assert "SECRET-VALUE" not in row.message, f"{row.id}: a secret is echoed"
        assert "Fix:" in row.message or "did you mean" in row.message or "valid" in row.message, (
            f"{row.id}: the message names no fix"
        )


def test_console_script_prints_the_same_line(inputs):
    """The installed `scalerl` script, not just the Typer app: same line, exit code 2."""
    row = next(r for r in ROWS if r.id == "storage-bad-scheme")
    env, args = _split(_expand(row.command, inputs, "", ""))
    out = subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=_full_env(env),
        cwd=inputs / "work",
    )
    assert (out.returncode, out.stderr, out.stdout) == (2, row.message + "\n", "")


@pytest.mark.parametrize("rel", ["../../escaped.txt", "/etc/escaped.txt", "a/./b", "a\\..\\b"])
def test_tampered_weight_manifest_cannot_write_outside(tmp_path, rel):
    """Weights are downloaded to local disk by path from _MANIFEST.json; a manifest edited by
    whoever can write the bucket must not place files outside the download directory."""
    from storage import open_store
    from storage.errors import ForeignFileError

    src = tmp_path / "w"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"weights")
    run = open_store(str(tmp_path / "store")).run("r1", create=True)
    run.publish_weights(0, src)
    manifest = tmp_path / "store" / "r1" / "weights" / "v0" / "_MANIFEST.json"
    doc = json.loads(manifest.read_text())
    doc["files"].append({"path": rel, "bytes": 7, "sha256": doc["files"][0]["sha256"]})
    manifest.write_text(json.dumps(doc))
    (tmp_path / "dl" / "deep").mkdir(parents=True)
    with pytest.raises(ForeignFileError, match=r"not a plain relative path inside v0/.*Fix: move"):
        run.download_weights(0, tmp_path / "dl" / "deep")
    assert not (tmp_path / "escaped.txt").exists()
    assert list((tmp_path / "dl").rglob("*")) == [tmp_path / "dl" / "deep"]


if __name__ == "__main__":
    _run_rows(sys.argv[1], sys.argv[2])
