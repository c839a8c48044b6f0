"""Every `scalerl` command against a REAL short tiny-cpu pipeline run (tests/flows/conftest.py
`real_run`: `scalerl run --preset tiny-cpu`, 6 trainer steps, an evaluation after each), on local
disk and on the S3-protocol server, and every kind of bad input on both.

Expected values are recomputed here from the committed shards and metric files, read with
pyarrow straight from the storage's filesystem, or with the formulas written below; never from
the commands' own earlier output.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import socket
import struct
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()
REAL_RUN_ID = "real-tiny"  # tests/flows/conftest.py REAL_RUN_ID
STAGES = ["eval", "filtered", "raw", "scored"]


def invoke(*args: str):
    return runner.invoke(app, list(args))


def ok(result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def one_line_error(result, *needles: str) -> str:
    """Exit 2, nothing on stdout, exactly one line `error: ... Fix: ...` on stderr, no traceback."""
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    assert result.stdout == "", result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    err = lines[0]
    assert err.startswith("error: ") and "Fix:" in err, err
    for needle in needles:
        assert needle in err, err
    return err


# -- reading the stored data with pyarrow -----------------------------------------------------


_CACHE: dict[tuple, object] = {}  # the real runs are read-only: read each thing once


def shard_files(real, stage: str) -> dict[str, str]:
    """{shard key: data file path on real.fs()} of the committed shards of `stage`."""
    if ("files", real.storage, stage) not in _CACHE:
        fs, _ = real.fs()
        out = {}
        for info in real.open().list_shards(stage):
            path = info.url.removeprefix("s3://").removeprefix("file://")
            out[info.key] = path
        assert set(out.values()) <= set(fs.find(f"{real.storage.removeprefix('s3://')}/{real.run_id}/shards/{stage}"))  # fmt: skip
        _CACHE[("files", real.storage, stage)] = out
    return _CACHE[("files", real.storage, stage)]


def stage_table(real, stage: str) -> pa.Table:
    if ("table", real.storage, stage) not in _CACHE:
        fs, _ = real.fs()
        tables = [pq.read_table(p, filesystem=fs) for p in shard_files(real, stage).values()]
        _CACHE[("table", real.storage, stage)] = pa.concat_tables(
            tables, promote_options="permissive"
        )
    return _CACHE[("table", real.storage, stage)]


def metrics_table(real, name: str) -> pa.Table:
    fs, root = real.fs()
    files = sorted(fs.glob(f"{root}/{real.run_id}/metrics/{name}/*.parquet"))
    assert files, f"no {name} metrics files"
    return pa.concat_tables(
        [pq.read_table(f, filesystem=fs) for f in files], promote_options="permissive"
    )


def eval_curve(real) -> tuple[list[int], list[float], list[float]]:
    """(versions, compute, held-out pass rate) recomputed from the eval shards: one shard per
    evaluated version; compute = version x completions per batch (compute_unit samples)."""
    cfg = real.config()
    assert cfg.schedule.compute_unit == "samples"
    per_batch = cfg.generation.prompts_per_batch * cfg.generation.samples_per_prompt
    versions, compute, rate = [], [], []
    fs, _ = real.fs()
    for key, path in sorted(shard_files(real, "eval").items()):
        version = int(key.removeprefix("v"))
        passed = pq.read_table(path, filesystem=fs, columns=["passed"]).column("passed")
        versions.append(version)
        compute.append(float(version * per_batch))
        rate.append(sum(passed.to_pylist()) / len(passed))
    return versions, compute, rate


def sigmoid(C: float, A: float, B: float, C_mid: float, R0: float) -> float:
    """The ScaleRL curve (SCALERL.md sec. 8)."""
    return R0 + (A - R0) / (1.0 + (C_mid / C) ** B)


def png_size(path) -> tuple[int, int]:
    """(width, height) from the PNG signature and IHDR chunk, parsed by hand."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def copy_run(real, keep=lambda rel: True):
    """A copy of the real run (the files whose run-relative path `keep` accepts) under a fresh
    root on the same backend, for tests that write or need a damaged run."""
    fs, root = real.fs()
    if real.endpoint is None:
        new_storage = f"{real.storage}-copy-{uuid.uuid4().hex[:6]}"
        new_root = new_storage
    else:
        new_storage = f"s3://scalerl-cli/{uuid.uuid4().hex[:8]}/runs"
        new_root = new_storage.removeprefix("s3://")
    src = f"{root}/{real.run_id}/"
    for path in fs.find(src):
        rel = path.removeprefix(src)
        if keep(rel):
            target = f"{new_root}/{real.run_id}/{rel}"
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.pipe_file(target, fs.cat_file(path))
    return dataclasses.replace(real, storage=new_storage, output="", log_records=[])


# -- scalerl run / runs ls / runs verify ------------------------------------------------------


def test_the_run_finished_and_printed_its_summary(real_run):
    status = real_run.open().read_status()
    assert status["state"] == "finished" and status["step"] == 6
    assert f"run {REAL_RUN_ID}: step 6 (max_steps)" in real_run.output
    assert "sigmoid fit: A=" in real_run.output


def test_runs_ls_shows_the_run(real_run):
    fs, root = real_run.fs()
    fs.invalidate_cache()
    with_marker = sorted(
        p.rstrip("/").rsplit("/", 1)[-1]
        for p in fs.ls(root, detail=False)
        if fs.exists(f"{p}/.scalerl-run.json")
    )
    lines = ok(invoke("runs", "ls", *real_run.args)).splitlines()
    assert lines[0] == f"storage: {real_run.storage}"
    assert lines[1].split() == ["RUN", "STATE", "STEP", "PASS", "RATE", "STARTED"]
    assert [line.split()[0] for line in lines[2:]] == with_marker == [REAL_RUN_ID]
    # the row: state and step from status.json / the weights, the pass rate of the newest
    # evaluation as counted from its eval shard, the start from the run's marker
    versions, _, rate = eval_curve(real_run)
    stamp = json.loads(fs.cat_file(f"{root}/{REAL_RUN_ID}/.scalerl-run.json"))["created_at"]
    day = dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%d")
    assert lines[2].split()[1:6] == ["finished", "6", f"{rate[-1]:.3f}", f"(v{versions[-1]})", day]


def test_runs_verify_is_ok(real_run):
    out = ok(invoke("runs", "verify", real_run.run_id, *real_run.args))
    facts = dict(line.split(": ", 1) for line in out.splitlines()[:-1])
    assert out.splitlines()[-1] == "ok"
    assert int(facts["raw_shards"]) == len(shard_files(real_run, "raw")) > 0
    assert int(facts["filtered_shards"]) == len(shard_files(real_run, "filtered"))
    assert int(facts["checkpoint_step"]) == 6
    assert int(facts["weight_versions"]) == 7  # v0 .. v6
    trainer = metrics_table(real_run, "trainer")
    assert int(facts["ledger_entries"]) == len(set(trainer.column("step").to_pylist())) == 6


# -- rollouts ls / show / stats / query -------------------------------------------------------


def test_rollouts_ls_lists_the_committed_shards(real_run):
    rows = json.loads(ok(invoke("rollouts", "ls", real_run.run_id, *real_run.args, "-f", "json")))
    fs, _ = real_run.fs()
    expected = {
        (stage, key): pq.read_metadata(path, filesystem=fs).num_rows
        for stage in STAGES
        for key, path in shard_files(real_run, stage).items()
    }
    assert {(r["stage"], r["shard"]): r["rows"] for r in rows} == expected
    assert {r["stage"] for r in rows} == set(STAGES)
    assert len(expected) >= 4 + 7  # raw/scored/filtered shards, eval v0..v6
    assert all(r["bytes"] > 0 and re.fullmatch(r"20\d\d-\d\d-\d\d \d\d:\d\d:\d\d", r["committed"]) for r in rows)  # fmt: skip
    raw = json.loads(
        ok(
            invoke(
                "rollouts", "ls", real_run.run_id, "--stage", "raw", *real_run.args, "-f", "json"
            )
        )
    )
    assert sorted(r["shard"] for r in raw) == sorted(shard_files(real_run, "raw"))
    table = ok(invoke("rollouts", "ls", real_run.run_id, "--stage", "eval", *real_run.args))
    assert f"{len(shard_files(real_run, 'eval'))} shards" in table and "v000006" in table


def _head(r: dict) -> tuple[str, str]:
    """Two parts of a completion's header line in `rollouts show`: how it starts (sample index,
    reward, passed) and its finish reason with the policy versions that wrote it."""
    span = f"v{r['min_version']}" + (
        f"..v{r['max_version']}" if r["max_version"] != r["min_version"] else ""
    )
    passed = {True: "passed", False: "failed", None: "unscored"}[r["passed"]]
    return f"#{r['sample_index']}  reward {r['reward']:.3g} ({passed}", f"finish {r['finish_reason']}  policy {span}"  # fmt: skip


def test_rollouts_show_a_prompt(real_run):
    filtered = stage_table(real_run, "filtered")  # `rollouts` = filtered once it has shards
    dropped = filtered.filter(pc.is_valid(filtered.column("filter_reason")))
    assert dropped.num_rows > 0  # zero-variance groups at a ~10% pass rate
    prompt_id = dropped.column("prompt_id")[0].as_py()
    mine = filtered.filter(pc.equal(filtered.column("prompt_id"), prompt_id)).to_pylist()
    out = ok(invoke("rollouts", "show", real_run.run_id, "--prompt", prompt_id, "-n", "10000", *real_run.args))  # fmt: skip
    assert f"prompt {prompt_id} · group" in out
    assert mine[0]["prompt"] in out and f"reference answer: {mine[0]['answer']}" in out
    assert out.count("  finish ") == len(mine)
    heads = [line for line in out.splitlines() if "  finish " in line]
    for r in mine:  # every completion, with its reward, pass/fail, finish reason and versions
        first, second = _head(r)
        assert any(h.startswith(first) and second in h for h in heads), (first, second)
        tokens = len(r["completion_token_ids"])
        assert any(f"tokens {tokens} (think {r['thinking_tokens']} + answer {r['answer_tokens']})" in h for h in heads)  # fmt: skip
    assert out.index(mine[0]["prompt"]) < out.index(heads[0])
    reasons = [r["filter_reason"] for r in mine if r["filter_reason"]]
    shown = [h.split("  filtered: ")[1] for h in heads if "  filtered: " in h]
    assert sorted(shown) == sorted(reasons) and reasons  # why the filter dropped them


def test_rollouts_show_a_step(real_run):
    scored = stage_table(real_run, "scored")
    step = 3
    spanning = pc.and_(
        pc.less_equal(scored.column("min_version"), step),
        pc.less_equal(step, scored.column("max_version")),
    )
    expected = scored.filter(spanning)
    assert expected.num_rows > 0
    out = ok(invoke("rollouts", "show", real_run.run_id, "--step", str(step), "--stage", "scored", "-n", "100000", *real_run.args))  # fmt: skip
    heads = [line for line in out.splitlines() if "  finish " in line]
    assert len(heads) == expected.num_rows
    for h in heads:
        lo, hi = re.search(r"policy v(\d+)(?:\.\.v(\d+))?", h).groups()
        assert int(lo) <= step <= int(hi or lo), h
    # --prompt and --step together: the intersection
    pid = expected.column("prompt_id")[0].as_py()
    both = expected.filter(pc.equal(expected.column("prompt_id"), pid)).num_rows
    out = ok(invoke("rollouts", "show", real_run.run_id, "--step", str(step), "--prompt", pid, "--stage", "scored", "-n", "100000", *real_run.args))  # fmt: skip
    assert out.count("  finish ") == both


def test_rollouts_stats_match_a_recomputation(real_run):
    rows = json.loads(
        ok(invoke("rollouts", "stats", real_run.run_id, "-f", "json", *real_run.args))
    )
    t = stage_table(real_run, "filtered")  # `rollouts` = filtered once it has shards
    start = np.array(t.column("min_version").to_pylist())
    span = np.array(t.column("max_version").to_pylist()) - start
    reward = np.array(t.column("reward").to_pylist(), dtype=float)
    passed = np.array(t.column("passed").to_pylist(), dtype=float)
    tokens = np.array([len(x) for x in t.column("completion_token_ids").to_pylist()])
    thinking = np.array(t.column("thinking_tokens").to_pylist())
    answer = np.array(t.column("answer_tokens").to_pylist())
    reason = np.array(t.column("finish_reason").to_pylist())
    trainer = metrics_table(real_run, "trainer").to_pylist()
    stale = {}
    for row in trainer:  # mean (step - min_version) of the samples trained at each step
        counts = {
            int(k.split("/")[1]): v or 0 for k, v in row.items() if k.startswith("staleness/")
        }
        if sum(counts.values()):
            stale[row["step"]] = sum(d * c for d, c in counts.items()) / sum(counts.values())
    assert [r["version"] for r in rows] == sorted(set(start.tolist()))
    assert sum(r["rollouts"] for r in rows) == t.num_rows
    for row in rows:
        m = start == row["version"]
        assert row["rollouts"] == m.sum()
        assert row["reward"] == pytest.approx(reward[m].mean())
        assert row["pass_rate"] == pytest.approx(passed[m].mean())
        assert row["tokens"] == pytest.approx(tokens[m].mean())
        assert row["thinking"] == pytest.approx(thinking[m].mean())
        assert row["answer"] == pytest.approx(answer[m].mean())
        assert row["truncated"] == pytest.approx((reason[m] == "length").mean())
        assert row["interrupted"] == pytest.approx((reason[m] == "interrupted").mean())
        assert row["span"] == pytest.approx(span[m].mean())
        assert row["stale@train"] == pytest.approx(stale.get(row["version"]))
    assert any(r["stale@train"] is not None for r in rows)
    raw = json.loads(ok(invoke("rollouts", "stats", real_run.run_id, "--stage", "raw", "-f", "json", *real_run.args)))  # fmt: skip
    assert sum(r["rollouts"] for r in raw) == stage_table(real_run, "raw").num_rows
    assert all(r["reward"] is None and r["pass_rate"] is None for r in raw)  # raw is unscored
    table = ok(invoke("rollouts", "stats", real_run.run_id, *real_run.args))
    assert "stale@train" in table and "by policy version" in table


def test_rollouts_query_matches_pyarrow(real_run):
    rid, args = real_run.run_id, real_run.args
    sql = (
        "SELECT min_version, count(*) AS n, sum(passed::INT) AS passed, "
        "sum(len(completion_token_ids)) AS tokens FROM rollouts GROUP BY 1 ORDER BY 1"
    )
    got = json.loads(ok(invoke("rollouts", "query", rid, sql, "-f", "json", *args)))
    t = stage_table(real_run, "filtered")
    grouped = (
        t.append_column("len", pc.list_value_length(t.column("completion_token_ids")))
        .group_by("min_version")
        .aggregate([("min_version", "count"), ("passed", "sum"), ("len", "sum")])
    )
    expected = sorted(
        zip(*(grouped.column(c).to_pylist() for c in ("min_version", "min_version_count", "passed_sum", "len_sum")), strict=True)
    )  # fmt: skip
    assert [(r["min_version"], r["n"], r["passed"], r["tokens"]) for r in got] == expected
    # every stage view (in one query: each invocation opens every view), and the metrics views
    counts = ", ".join(f"(SELECT count(*) FROM {stage}) AS {stage}" for stage in STAGES)
    got = json.loads(ok(invoke("rollouts", "query", rid, f"SELECT {counts}", "-f", "json", *args)))
    assert got == [{stage: stage_table(real_run, stage).num_rows for stage in STAGES}]
    evals = json.loads(ok(invoke("rollouts", "query", rid, "SELECT step, compute, pass_rate FROM metrics_eval ORDER BY step", "-f", "json", *args)))  # fmt: skip
    versions, compute, rate = eval_curve(real_run)
    assert [e["step"] for e in evals] == versions == list(range(7))
    assert [e["compute"] for e in evals] == compute
    assert [e["pass_rate"] for e in evals] == pytest.approx(rate)
    csv = ok(invoke("rollouts", "query", rid, "SELECT finish_reason, count(*) AS n FROM raw GROUP BY 1 ORDER BY 1", "-f", "csv", *args))  # fmt: skip
    raw_reasons = stage_table(real_run, "raw").column("finish_reason").to_pylist()
    assert csv.splitlines() == ["finish_reason,n"] + [
        f"{k},{raw_reasons.count(k)}" for k in sorted(set(raw_reasons))
    ]
    table = ok(invoke("rollouts", "query", rid, "SELECT count(*) AS n FROM eval", *args))
    assert str(stage_table(real_run, "eval").num_rows) in table


# -- export -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "hf"])
def test_rollouts_export_round_trips(real_run, fmt, tmp_path):
    out = tmp_path / "export"
    before = real_run.listing()
    text = ok(invoke("rollouts", "export", real_run.run_id, "--format", fmt, "-o", str(out), *real_run.args))  # fmt: skip
    assert real_run.listing() == before  # exporting reads only
    tables = {s: stage_table(real_run, s) for s in STAGES}
    manifest = json.loads((out / "export.json").read_text())
    assert {s: m["rows"] for s, m in manifest["stages"].items()} == {
        s: t.num_rows for s, t in tables.items()
    }
    assert f"exported {sum(len(shard_files(real_run, s)) for s in STAGES)} shards" in text
    for stage, table in tables.items():
        if fmt == "parquet":
            files = sorted((out / stage).glob("*.parquet"))
            assert sorted(f.stem for f in files) == sorted(shard_files(real_run, stage))
            got = pq.read_table(files)
            assert got.num_rows == table.num_rows and got.column_names == table.column_names
            assert sorted(got.column("completion").to_pylist()) == sorted(
                table.column("completion").to_pylist()
            )
        elif fmt == "jsonl":
            rows = [json.loads(line) for line in (out / f"{stage}.jsonl").read_text().splitlines()]
            assert len(rows) == table.num_rows
            assert all(list(r) == table.column_names for r in rows)
            assert sum(bool(r["passed"]) for r in rows) == sum(
                bool(p) for p in table.column("passed").to_pylist()
            )
        else:
            import datasets

            split = datasets.load_from_disk(str(out))[stage]
            assert split.num_rows == table.num_rows
            assert split.column_names == table.column_names
            assert sorted(split["prompt_id"]) == sorted(table.column("prompt_id").to_pylist())
    if fmt == "hf":
        import datasets

        assert set(datasets.load_from_disk(str(out))) == set(STAGES)
    assert not [p for p in tmp_path.iterdir() if p.name != "export"]  # no temporary left over


# -- curve fit / plot -------------------------------------------------------------------------


def test_curve_fit_matches_a_fit_of_the_eval_shards(real_run):
    from scalerl.scaling import fit_sigmoid

    versions, compute, rate = eval_curve(real_run)
    assert versions == list(range(7)) and compute[0] == 0
    target = 4 * compute[-1]
    fit = json.loads(
        ok(
            invoke(
                "curve",
                "fit",
                real_run.run_id,
                "--json",
                "--target-compute",
                str(target),
                *real_run.args,
            )
        )  # fmt: skip
    )
    # R0 is the pass rate of version 0; the other six points are fitted (exclude nothing)
    mine = fit_sigmoid(compute[1:], rate[1:], R0=rate[0], exclude_fraction=0.0, bootstrap=100)
    assert fit["R0"] == pytest.approx(rate[0])
    assert fit["n_points"] == 6 and fit["compute_unit"] == "samples"
    assert fit["last_compute"] == compute[-1] and fit["last_pass_rate"] == pytest.approx(rate[-1])
    for name, value in (("A", mine.A), ("B", mine.B), ("C_mid", mine.C_mid)):
        assert fit[name] == pytest.approx(value, rel=1e-9), name
    assert (fit["A_low"], fit["A_high"]) == pytest.approx(mine.A_interval)
    assert fit["A_low"] <= fit["A"] <= fit["A_high"]
    assert fit["prediction"] == pytest.approx(sigmoid(target, fit["A"], fit["B"], fit["C_mid"], fit["R0"]))  # fmt: skip
    residual = sum(
        (sigmoid(c, fit["A"], fit["B"], fit["C_mid"], fit["R0"]) - r) ** 2
        for c, r in zip(compute[1:], rate[1:], strict=True)
    )  # sum of squared errors over the fitted points
    assert fit["residual"] == pytest.approx(residual, rel=1e-6)
    # the pipeline's own fit at the end of the run (metrics/scaling) agrees
    scaling = metrics_table(real_run, "scaling").to_pylist()[-1]
    for name in ("A", "B", "C_mid", "R0", "A_low", "A_high"):
        assert scaling[name] == pytest.approx(fit[name]), name
    text = ok(invoke("curve", "fit", real_run.run_id, "--target-compute", str(target), *real_run.args))  # fmt: skip
    lines = text.splitlines()
    assert lines[0].startswith(f"A     = {fit['A']:.4f}  (90% bootstrap interval [{fit['A_low']:.4f}, {fit['A_high']:.4f}])")  # fmt: skip
    assert f"B     = {fit['B']:.4f}" in lines and f"R0    = {fit['R0']:.4f}" in lines
    assert f"C_mid = {fit['C_mid']:.6g} samples" in lines
    # the prediction comes with its 90% interval for one evaluation (tests/scalerl/test_scaling.py
    # checks the formula); the CLI makes it on the same points
    from scalerl.scaling import predict_sigmoid

    pred = predict_sigmoid(compute[1:], rate[1:], target, R0=rate[0], exclude_fraction=0.0)
    assert (fit["prediction_low"], fit["prediction_high"]) == pytest.approx((pred.low, pred.high))
    assert fit["prediction_low"] <= fit["prediction"] <= fit["prediction_high"]
    assert (
        f"predicted pass rate at {target:.6g} samples: {fit['prediction']:.4f} "
        f"[{fit['prediction_low']:.4f}, {fit['prediction_high']:.4f}] (90% prediction interval "
        "for one evaluation there)"
    ) in lines


@pytest.mark.parametrize("kind", ["curve", "lengths", "staleness"])
def test_curve_plot_writes_an_800x500_png(real_run, kind, tmp_path):
    path = tmp_path / "plots" / f"{kind}.png"
    before = real_run.listing()
    out = ok(invoke("curve", "plot", real_run.run_id, "-o", str(path), "--kind", kind, *real_run.args))  # fmt: skip
    assert out.strip() == f"wrote {path}"
    assert png_size(path) == (800, 500)
    with Image.open(path) as image:
        image.verify()  # CRCs and structure
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and image.size == (800, 500)
        assert len(set(image.convert("L").getdata())) > 2  # something was drawn
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    assert real_run.listing() == before


# -- resume / doctor --------------------------------------------------------------------------


def test_resume_of_a_finished_run_writes_nothing(real_run):
    """`scalerl resume` of a finished run says so (exit 0) and leaves the run as it is."""
    before = real_run.listing()
    out = ok(invoke("resume", real_run.run_id, *real_run.args))
    assert out.splitlines() == [
        f"run {REAL_RUN_ID} already finished at step 6 (max_steps): nothing to resume, nothing "
        "written. To train further, start a new run (`scalerl run`)."
    ]
    assert real_run.listing() == before


def test_resume_of_an_interrupted_moved_run_completes_it(real_run):
    """A copy of the run (another storage root: a moved run) whose status says it was still
    running when its process died: resume finishes it without touching committed data."""
    moved = copy_run(real_run)
    run = moved.open()
    run.write_status({"state": "running", "reason": "prepared"})
    raw_before = {s.key: s.committed_at for s in run.list_shards("raw")}
    out = ok(invoke("resume", moved.run_id, *moved.args))
    assert f"run {REAL_RUN_ID}: step 6 (max_steps)" in out
    assert run.read_status()["state"] == "finished"
    after = {s.key: s.committed_at for s in run.list_shards("raw")}
    assert {k: after[k] for k in raw_before} == raw_before
    assert run.read_config()["storage"]["url"] == moved.storage  # points at where it lives now
    assert ok(invoke("runs", "verify", moved.run_id, *moved.args)).splitlines()[-1] == "ok"


def test_doctor_prints_one_line_per_check(real_run):
    out = ok(invoke("doctor", *real_run.args))
    lines = out.splitlines()
    names = ["Python", "torch", "CUDA", "vLLM", "storage", "Prefect API"]
    assert [re.match(r"(ok|warn|fail) +([^:]+): ", line).group(2) for line in lines] == names
    storage = lines[names.index("storage")]
    assert storage.startswith("ok") and "reachable, 1 run(s)" in storage


# -- bad input: exit 2, one line with the fix, no traceback, nothing written --------------------


def _commands(run_id: str, tmp_path) -> list[list[str]]:
    return [
        ["rollouts", "ls", run_id],
        ["rollouts", "show", run_id, "--prompt", "p1"],
        ["rollouts", "stats", run_id],
        ["rollouts", "query", run_id, "SELECT 1"],
        ["rollouts", "export", run_id, "-f", "jsonl", "-o", str(tmp_path / "out" / "x")],
        ["curve", "fit", run_id],
        ["curve", "plot", run_id, "-o", str(tmp_path / "out" / "c.png")],
        ["runs", "verify", run_id],
        ["resume", run_id],
    ]


def test_unknown_run_id(real_run, tmp_path):
    before = real_run.listing()
    for command in _commands("no-such-run", tmp_path):
        err = one_line_error(invoke(*command, *real_run.args), "'no-such-run' does not exist")
        assert REAL_RUN_ID in err  # names the runs that do exist
    assert real_run.listing() == before
    assert list(tmp_path.iterdir()) == []


def test_malformed_sql(real_run):
    before = real_run.listing()
    rid, args = real_run.run_id, real_run.args
    err = one_line_error(invoke("rollouts", "query", rid, "SELEC * FROM rollouts", *args))
    assert "syntax error" in err and "views are raw" in err
    one_line_error(invoke("rollouts", "query", rid, "SELECT nope FROM raw", *args), "nope")
    one_line_error(invoke("rollouts", "query", rid, "SELECT * FROM tbl", *args), "tbl")
    assert real_run.listing() == before


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreadable_storage_url(real_run, tmp_path):
    out = tmp_path / "out"
    every = [["runs", "ls"], *_commands(REAL_RUN_ID, out)]
    if real_run.kind == "local":
        bad = [  # (storage args, what the error names, the commands tried)
            (["--storage", "ftp://host/runs"], "unsupported scheme", every),
            (["--storage", "gs://bucket/runs"], "unsupported scheme", every[:4]),
        ]
    else:
        port = _closed_port()  # retried briefly before giving up: two commands suffice
        bad = [
            (
                ["--storage", "s3://no-such-bucket-x/runs", "--endpoint-url", real_run.endpoint],
                "no-such-bucket-x",
                every,
            ),  # fmt: skip
            (
                ["--storage", "s3://", "--endpoint-url", real_run.endpoint],
                "names no bucket",
                every[:4],
            ),  # fmt: skip
            (
                ["--storage", real_run.storage, "--endpoint-url", f"http://127.0.0.1:{port}"],
                str(port),
                [every[1], every[6]],
            ),  # fmt: skip
        ]
    before = real_run.listing()
    for storage_args, named, commands in bad:
        for command in commands:
            one_line_error(invoke(*command, *storage_args), named)
    assert real_run.listing() == before
    assert not out.exists()


def test_a_storage_root_under_a_regular_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for command in [["runs", "ls"], *_commands(REAL_RUN_ID, tmp_path / "out")]:
        one_line_error(
            invoke(*command, "--storage", str(blocker / "runs")), str(blocker), "Not a directory"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.integration
def test_missing_credentials(real_s3_run, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    before = real_s3_run.listing()  # the test's own key, not the environment's
    out = tmp_path / "out"
    for command in [["runs", "ls"], *_commands(REAL_RUN_ID, out)]:
        one_line_error(invoke(*command, *real_s3_run.args), "no credentials", "AWS_ACCESS_KEY_ID")
    assert real_s3_run.listing() == before
    assert not out.exists()


def test_curve_of_a_run_without_evaluation_points(real_run, tmp_path):
    """The real run copied without its evaluation metrics (as it is before its first
    evaluation is recorded): curve fit and curve plot say so and write nothing."""
    bare = copy_run(real_run, keep=lambda rel: not rel.startswith("metrics/eval/"))
    assert bare.open().read_metrics("eval").num_rows == 0
    assert ok(invoke("rollouts", "ls", bare.run_id, *bare.args))  # the copy is readable
    before = bare.listing()
    png = tmp_path / "plots" / "c.png"
    for command in (["curve", "fit", bare.run_id], ["curve", "plot", bare.run_id, "-o", str(png)]):
        one_line_error(invoke(*command, *bare.args), "no evaluation points", "evaluation.every_steps")  # fmt: skip
    assert bare.listing() == before
    assert not png.parent.exists()


def test_debug_shows_the_traceback(real_run):
    result = invoke("--debug", "rollouts", "query", real_run.run_id, "SELEC", *real_run.args)
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "QueryError"
