"""The user surface over a hand-made run (tests/flows/conftest.py `demo`, built with the storage
API: its numbers are known in advance), on local disk and on an S3-protocol server: what a real
pipeline run cannot show (the fit recovering a known sigmoid, markup in prompts, too few
evaluation points, a corrupt shard, doctor's failures, the console script). Every command against
a real tiny-cpu run, and the bad inputs every command shares: tests/flows/test_cli_real_run.py.

Expected numbers are computed here from the records the fixture committed, never from the
commands' own earlier output.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from storage import open_store

runner = CliRunner()
SCRIPT = Path(sys.executable).parent / "scalerl"


def invoke(*args: str):
    return runner.invoke(app, list(args))


def ok(result):
    assert result.exit_code == 0, result.output
    return result.stdout


def one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    *progress, err = result.stderr.strip().splitlines()
    assert err.startswith("error: "), result.stderr
    assert all(line.startswith("export: ") for line in progress), result.stderr  # plain progress
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in err, err
    return err


# -- rollouts ls / show / stats / query -------------------------------------------------------


def test_rollouts_show_prompt_prints_prompt_then_each_completion(demo):
    records = [r for r in demo.records["scored"] if r["prompt_id"] == "p002"]
    out = ok(
        invoke(
            "rollouts", "show", demo.run_id, "--prompt", "p002", "--stage", "scored",
            "--limit", "50", *demo.args,
        )
    )  # fmt: skip
    assert records and records[0]["prompt"] in out  # brackets in the text survive (no markup)
    assert out.index(records[0]["prompt"]) < out.index(records[0]["completion"])
    for r in records:
        assert r["completion"] in out
    assert out.count("  finish ") == len(records)
    passed = sum(r["passed"] for r in records)
    assert out.count("(passed, correct)") == passed
    assert out.count("(failed, wrong)") == len(records) - passed


def test_rollouts_show_unknown_prompt_lists_real_prompt_ids(local_demo):
    # README's example id (p017) is in no run: the error names the ids that exist
    s = ["--storage", local_demo.storage]
    first = sorted({r["prompt_id"] for r in local_demo.records["filtered"]})[:5]
    err = one_line_error(
        invoke("rollouts", "show", "demo", "--prompt", "p017", *s),
        "no prompt 'p017' in 'rollouts' of run 'demo'",
        f"prompt ids look like {first[0]} (first few: {', '.join(first)})",
        f"`scalerl rollouts show demo --prompt {first[0]}`",
        '"SELECT DISTINCT prompt_id FROM rollouts ORDER BY 1"',
    )
    assert "Fix:" in err
    ids = sorted({r["prompt_id"] for r in local_demo.records["scored"]})
    scored = one_line_error(
        invoke("rollouts", "show", "demo", "--prompt", "x", "--stage", "scored", *s)
    )
    assert f"(first few: {', '.join(ids[:5])})" in scored
    # a prompt that exists but not at that version: the usual "no completions match"
    pid = first[0]
    versions = [
        v for r in local_demo.records["filtered"] if r["prompt_id"] == pid for v in r["versions"]
    ]
    err = one_line_error(
        invoke("rollouts", "show", "demo", "--prompt", pid, "--step", str(max(versions) + 100), *s),
        f"no completions in 'rollouts' of run 'demo' match --prompt {pid} --step",
    )
    assert "prompt ids look like" not in err


def test_rollouts_query_formats(demo):
    sql = "SELECT finish_reason, count(*) AS n FROM raw GROUP BY 1 ORDER BY 1"
    expected = {}
    for r in demo.records["raw"]:
        expected[r["finish_reason"]] = expected.get(r["finish_reason"], 0) + 1
    rows = json.loads(ok(invoke("rollouts", "query", demo.run_id, sql, "-f", "json", *demo.args)))
    assert {r["finish_reason"]: r["n"] for r in rows} == expected
    csv = ok(invoke("rollouts", "query", demo.run_id, sql, "--format", "csv", *demo.args))
    assert csv.splitlines()[0] == "finish_reason,n"
    assert sorted(csv.splitlines()[1:]) == sorted(f"{k},{v}" for k, v in expected.items())
    table = ok(invoke("rollouts", "query", demo.run_id, sql, *demo.args))
    assert "finish_reason" in table and "interrupted" in table
    literal = "SELECT '[bold]x[/bold]' AS markup, sum(thinking_tokens) AS total FROM raw"
    assert "[bold]x[/bold]" in ok(invoke("rollouts", "query", demo.run_id, literal, *demo.args))
    total = json.loads(
        ok(invoke("rollouts", "query", demo.run_id, literal, "-f", "json", *demo.args))
    )
    assert total == [  # DuckDB sums integers as HUGEINT (a Decimal in Python): still a JSON number
        {
            "markup": "[bold]x[/bold]",
            "total": sum(r["thinking_tokens"] for r in demo.records["raw"]),
        }
    ]
    evals = json.loads(
        ok(
            invoke(
                "rollouts", "query", demo.run_id,
                "SELECT step, pass_rate FROM metrics_eval ORDER BY step", "-f", "json", *demo.args,
            )
        )
    )  # fmt: skip
    assert [e["pass_rate"] for e in evals] == pytest.approx(
        [e["pass_rate"] for e in demo.eval_rows]
    )
    count = "SELECT count(*) AS n FROM rollouts WHERE filter_reason IS NULL"
    kept = sum(r["filter_reason"] is None for r in demo.records["filtered"])
    assert (
        json.loads(ok(invoke("rollouts", "query", demo.run_id, count, "-f", "json", *demo.args)))[
            0
        ]["n"]
        == kept
    )


def test_query_help_documents_the_views():
    out = ok(invoke("rollouts", "query", "--help"))
    for view in ("rollouts", "raw", "scored", "filtered", "eval", "metrics_eval"):
        assert view in out


def test_query_is_read_only(demo, tmp_path):
    err = one_line_error(
        invoke("rollouts", "query", demo.run_id, "SELECT * FROM read_csv('/etc/passwd')", *demo.args),
        'outside the run\'s views (Cannot access file "/etc/passwd")',
        "rollouts query is read-only. Fix: query the views (raw, ",
        f"`scalerl rollouts export {demo.run_id} -f parquet -o DIR`",
    )  # fmt: skip
    assert "root:" not in err
    target = f"{tmp_path}/x.json"
    one_line_error(
        invoke("rollouts", "query", demo.run_id, f"COPY (SELECT 1) TO '{target}'", *demo.args),
        "read-only",
    )
    assert not Path(target).exists()
    one_line_error(
        invoke("rollouts", "query", demo.run_id, "SET enable_external_access = true", *demo.args),
        "tried to change a setting",
    )
    assert "Read-only" in ok(invoke("rollouts", "query", "--help"))


def test_query_with_a_deleted_shard_file_is_one_line(make_demo_run, tmp_path):
    demo = make_demo_run(str(tmp_path / "runs"), None, None)
    victim = open_store(demo.storage).run("demo").list_shards("raw")[0].url
    Path(victim).unlink()
    one_line_error(
        invoke("rollouts", "query", "demo", "SELECT count(*) FROM raw", "--storage", demo.storage),
        f"committed shard file {victim} is missing. Fix: run `scalerl runs verify demo`",
    )


# -- export -----------------------------------------------------------------------------------


def test_rollouts_export_one_stage(demo, tmp_path):
    out = tmp_path / "only-eval"
    ok(invoke("rollouts", "export", demo.run_id, "-f", "parquet", "-o", str(out), "--stage", "eval", *demo.args))  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["eval", "export.json"]
    assert len(list((out / "eval").glob("*.parquet"))) == 8


# -- curve ------------------------------------------------------------------------------------


def test_curve_fit_recovers_the_sigmoid_and_predicts(demo):
    def sigmoid(C, A, B, C_mid, R0):  # SCALERL.md sec. 8
        return R0 + (A - R0) / (1 + (C_mid / C) ** B)

    target = 20_000.0
    truth = demo.truth
    fit = json.loads(
        ok(
            invoke(
                "curve", "fit", demo.run_id, "--json", "--target-compute", str(target), *demo.args
            )
        )
    )
    assert fit["A"] == pytest.approx(truth["A"], abs=0.01)
    assert fit["B"] == pytest.approx(truth["B"], rel=0.05)
    assert fit["C_mid"] == pytest.approx(truth["C_mid"], rel=0.05)
    assert fit["R0"] == pytest.approx(truth["R0"])
    assert fit["A_low"] <= fit["A"] <= fit["A_high"]
    fitted = sigmoid(target, fit["A"], fit["B"], fit["C_mid"], fit["R0"])
    assert fit["prediction"] == pytest.approx(fitted)
    assert fit["prediction"] == pytest.approx(sigmoid(target, **truth), abs=0.01)
    assert fit["n_points"] == 7 and fit["compute_unit"] == "samples"
    text = ok(invoke("curve", "fit", demo.run_id, "--target-compute", "20000", *demo.args))
    assert "A     = 0.60" in text and "C_mid" in text and "predicted pass rate at 20000" in text


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_curve_plot_files_get_the_usual_mode(local_demo, tmp_path, umask):
    """A plot is a file the user asked for: mode 0o666 & ~umask like any other, not mkstemp's
    0o600, and no temporary sibling is left behind."""
    old = os.umask(umask)
    try:
        for kind in ("curve", "lengths", "staleness"):
            path = tmp_path / f"{kind}.png"
            ok(invoke("curve", "plot", "demo", "--kind", kind, "-o", str(path), "--storage", local_demo.storage))  # fmt: skip
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, (kind, oct(path.stat().st_mode))
    finally:
        os.umask(old)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["curve.png", "lengths.png", "staleness.png"]  # no .tmp-* left


# -- doctor -----------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_doctor_reports_each_component(local_demo, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    # A test harness started earlier in the session sets the API URL in Prefect's settings.
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        out = ok(invoke("doctor", "--storage", local_demo.storage))
    lines = out.splitlines()
    for what in ("Python", "torch", "CUDA", "vLLM", "storage", "Prefect API"):
        assert sum(f" {what}: " in line for line in lines) == 1, out
    assert "embedded temporary server will be used" in out
    assert "1 run(s)" in out


def test_doctor_fails_with_fixes_when_prefect_or_storage_are_unreachable(monkeypatch):
    port = _closed_port()
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    result = invoke(
        "doctor", "--storage", "s3://some-bucket/runs", "--endpoint-url", f"http://127.0.0.1:{port}"
    )
    assert result.exit_code == 2
    fails = [line for line in result.stdout.splitlines() if line.startswith("fail")]
    assert len(fails) == 2
    assert "storage" in fails[0] and "does not answer" in fails[0] and "Fix:" in fails[0]
    assert "Prefect API" in fails[1] and "prefect server start" in fails[1]


# -- bad input: exit 2, one line, nothing written ---------------------------------------------


def test_unknown_stage_and_format(local_demo, tmp_path):
    s = ["--storage", local_demo.storage]
    one_line_error(invoke("rollouts", "ls", "demo", "--stage", "nope", *s), "'nope'", "raw")
    one_line_error(invoke("rollouts", "stats", "demo", "--stage", "nope", *s), "'nope'")
    one_line_error(invoke("rollouts", "query", "demo", "SELECT 1", "-f", "xml", *s), "xml")
    one_line_error(
        invoke("rollouts", "export", "demo", "-f", "xml", "-o", str(tmp_path / "o"), *s), "xml"
    )
    one_line_error(invoke("curve", "plot", "demo", "-o", str(tmp_path / "a.png"), "--kind", "pie", *s), "pie")  # fmt: skip
    one_line_error(invoke("curve", "plot", "demo", "-o", str(tmp_path / "a.jpg"), *s), ".png")
    one_line_error(
        invoke("rollouts", "show", "demo", "--prompt", "nope", *s), "no prompt 'nope'", "Fix:"
    )
    assert list(tmp_path.iterdir()) == []


def test_curve_without_evaluation_points(tmp_path):
    storage = str(tmp_path / "runs")
    open_store(storage).run("fresh", create=True)
    for args in (
        ["curve", "fit", "fresh"],
        ["curve", "plot", "fresh", "-o", str(tmp_path / "c.png")],
    ):
        one_line_error(invoke(*args, "--storage", storage), "no evaluation points", "Fix:")
    assert not (tmp_path / "c.png").exists()
    run = open_store(storage).run("fresh")
    run.append_metrics(
        "eval", [{"step": s, "compute": 100.0 * s, "pass_rate": 0.1} for s in range(3)]
    )
    one_line_error(invoke("curve", "fit", "fresh", "--storage", storage), "2 evaluation point(s)")
    one_line_error(
        invoke("curve", "plot", "fresh", "--kind", "staleness", "-o", str(tmp_path / "s.png"), "--storage", storage),
        "no staleness",
    )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_export_leaves_nothing_when_it_fails_midway(make_demo_run, tmp_path):
    demo = make_demo_run(str(tmp_path / "runs"), None, None)
    run = open_store(demo.storage).run("demo")
    victim = run.list_shards("scored")[-1].url  # corrupt the last shard exported
    Path(victim).write_bytes(Path(victim).read_bytes()[:-100])
    out = tmp_path / "exports" / "x"
    err = one_line_error(
        invoke("rollouts", "export", "demo", "-f", "parquet", "-o", str(out), "--storage", demo.storage),
        "corrupt",
    )  # fmt: skip
    assert "Fix:" in err
    assert not (tmp_path / "exports").exists()


def test_export_refuses_a_non_empty_directory(local_demo, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    one_line_error(
        invoke("rollouts", "export", "demo", "-f", "jsonl", "-o", str(tmp_path), "--storage", local_demo.storage),
        "not an empty directory",
    )  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


# -- the real console script -------------------------------------------------------------------


def test_console_script_query_and_bad_input(local_demo):
    env = {**os.environ, "SCALERL_STORAGE": local_demo.storage}
    out = subprocess.run(
        [str(SCRIPT), "rollouts", "query", "demo", "SELECT count(*) AS n FROM eval", "-f", "json"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [{"n": 64}]
    bad = subprocess.run(
        [str(SCRIPT), "curve", "fit", "missing"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: run 'missing'")
    assert "Traceback" not in bad.stderr


@pytest.mark.integration
def test_aws_endpoint_url_variable_is_honoured(s3_demo, s3_credentials, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_demo.endpoint)
    rows = json.loads(
        ok(invoke("rollouts", "ls", "demo", "--storage", s3_demo.storage, "-f", "json"))
    )
    assert len(rows) == sum(len({r["shard_id"] for r in recs}) for recs in s3_demo.records.values())
