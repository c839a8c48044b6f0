"""`scalerl runs verify` checks content, not only sizes: 64 bytes flipped in a file (same size)
are found in the final weights, a checkpoint and a raw shard, each named on one PROBLEM line;
`--fast` checks sizes only and says so; a shard committed before commit records carried a
sha256 is checked by its CRC-32 and counted; a damaged curriculum file is one PROBLEM line, never
a traceback. The small finished run of tests/tasks/test_verify_losses.py (built through the
store API, real files); the CLI through typer's runner, in this process."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from flows.cli import app
from runtime.verify import verify_run
from storage import open_store
from tests.tasks.test_verify_losses import EVALUATED, RUN, STEPS, WEIGHT_BYTES, _build


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pristine")
    _build(tmp / "runs", tmp)
    return tmp / "runs"


@pytest.fixture
def copy(pristine, tmp_path):
    shutil.copytree(pristine, tmp_path / "runs")
    return open_store(str(tmp_path / "runs")).run(RUN), tmp_path / "runs"


def _flip(path, n: int = 64) -> None:
    """Invert n bytes in the middle of the file: same size, other content."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2 - n // 2
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    path.write_bytes(bytes(data))


def _verify(root, *args):
    return CliRunner().invoke(app, ["runs", "verify", RUN, "--storage", str(root), *args])


def test_a_pristine_run_hashes_every_shard_and_every_checked_weights_and_checkpoint_file(copy):
    run, root = copy
    report = verify_run(run)
    assert report.ok, report.problems
    base = root / RUN
    shards = [s for stage in ("raw", "scored", "filtered", "eval") for s in run.list_shards(stage)]
    # weights checked: the latest and every evaluated version, one file each; checkpoints:
    # every file of each committed one
    weights = sorted({STEPS, *EVALUATED})
    ckpt_files = [f for step in (2, 4) for f in (base / "checkpoints" / f"step-{step}").iterdir()]
    ckpt_files = [f for f in ckpt_files if f.name != "_MANIFEST.json"]
    assert report.facts["files_hashed"] == len(shards) + len(weights) + len(ckpt_files)
    assert report.facts["bytes_hashed"] == (
        sum(s.bytes for s in shards)
        + len(weights) * WEIGHT_BYTES
        + sum(f.stat().st_size for f in ckpt_files)
    )
    assert not any("CRC-32" in r or "--fast" in r for r in report.remarks)


def test_bit_rot_at_the_same_size_is_named_and_fast_mode_says_it_checks_sizes_only(copy):
    run, root = copy
    base = root / RUN
    weights = base / "weights" / f"v{STEPS}" / "model.safetensors"
    (raw,) = [s for s in run.list_shards("raw") if s.key == "gen0-000001"]
    raw_file = base / "shards" / "raw" / "data" / raw.url.rsplit("/", 1)[-1]
    optimizer = base / "checkpoints" / "step-2" / "optimizer.pt"
    for path in (weights, raw_file, optimizer):
        _flip(path)

    problems = verify_run(run).problems
    assert problems == [
        f"weights v{STEPS} (the latest, evaluated) is damaged: model.safetensors does not match "
        f"its manifest's sha256 (same size, {WEIGHT_BYTES:,} bytes) (weights/v{STEPS}/"
        "_MANIFEST.json). Fix: restore the file from a copy of the run",
        "checkpoint step-2 is damaged: optimizer.pt does not match its manifest's sha256 (same "
        "size, 5,000 bytes) (checkpoints/step-2/_MANIFEST.json). Fix: resume the run: the "
        "trainer quarantines it and resumes from the base model (none older is intact)",
        f"raw shard gen0-000001 is damaged: shards/raw/data/{raw_file.name}: its content does "
        f"not match the sha256 of its commit record (same size, {raw.bytes:,} bytes). Fix: "
        "restore the file from a copy of the run (a stage that reads it quarantines it)",
    ]
    full = _verify(root)
    assert full.exit_code == 1, full.output
    assert full.output.count("PROBLEM:") == 3 and "3 problem(s)" in full.output

    fast = _verify(root, "--fast")
    assert fast.exit_code == 0, fast.output
    assert "--fast: sizes only; no file was hashed" in fast.output
    assert "files_hashed: 0" in fast.output and fast.output.rstrip().endswith("ok")


def test_a_record_without_sha256_is_checked_by_its_crc32_and_counted(copy):
    run, root = copy
    base = root / RUN
    record = base / "shards" / "filtered" / "commits" / "gen0-000000.json"
    doc = json.loads(record.read_text())
    assert len(doc.pop("sha256")) == 64  # new records carry it
    record.write_text(json.dumps(doc, indent=1))
    report = verify_run(run)
    assert report.ok, report.problems
    assert (
        "1 shard(s) were committed before commit records carried a sha256: their data files "
        "were checked against the record's CRC-32"
    ) in report.remarks

    _flip(base / "shards" / "filtered" / "data" / doc["data"].split("/", 1)[1])
    assert verify_run(run).problems == [
        f"filtered shard gen0-000000 is damaged: shards/filtered/{doc['data']}: its content "
        f"does not match the CRC-32 of its commit record (same size, {doc['bytes']:,} bytes). "
        "Fix: restore the file from a copy of the run (a stage that reads it quarantines it)"
    ]


@pytest.mark.parametrize(
    "damage", [b'{"version": 1, "sta', b'{"version": 1, "state": {"sampler": {}}}']
)
def test_a_damaged_curriculum_file_is_one_problem_line_not_a_traceback(copy, damage):
    _, root = copy
    path = root / RUN / "curriculum" / "v1.json"
    path.write_bytes(damage)
    result = _verify(root)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    problems = [line for line in result.output.splitlines() if line.startswith("PROBLEM:")]
    assert len(problems) == 1, result.output
    assert f"curriculum file {path} is damaged" in problems[0] and "Fix:" in problems[0]
    # the run has finished: no resume rebuilds it, and the line says so
    assert "the run has finished, so `scalerl resume` leaves it as it is" in problems[0]
