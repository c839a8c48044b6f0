"""Metrics of a step that was redone (a trainer resumed from an older checkpoint, an evaluation
run again, two writers) are read once: Run.read_metrics keeps the last row written per trainer
step and per eval version, sorted by it; a stream without a key keeps every row."""

from __future__ import annotations

import pyarrow as pa

from runtime.verify import verify_run
from storage import open_store
from storage.query import RolloutQuery
from storage.store import latest_metrics

STALENESS = {0: 5, 1: 3}  # samples per step at staleness d, as the trainer writes them


def _store(backend):
    url, options = backend
    return open_store(url, storage_options=options)


def loss(step: int, attempt: int) -> float:
    """The value the test writes for `step` at its `attempt`-th training (1 = first)."""
    return 10.0 * step + attempt


def trainer_row(step: int, attempt: int) -> dict:
    return {
        "step": step,
        "loss": loss(step, attempt),
        **{f"staleness/{d}": n for d, n in STALENESS.items()},
    }


def _redone_trainer(run) -> None:
    """Steps 1..5, a crash, a resume from the checkpoint at step 2 that trains 3..4 again, then
    step 6; one part file per step, as the trainer's metrics sink appends them."""
    for step in range(1, 6):
        run.append_metrics("trainer", [trainer_row(step, 1)])
    for step in (3, 4):
        run.append_metrics("trainer", [trainer_row(step, 2)])
    run.append_metrics("trainer", [trainer_row(6, 1)])


def test_a_redone_trainer_step_replaces_its_earlier_row(backend):
    run = _store(backend).run("r1", create=True)
    _redone_trainer(run)
    table = run.read_metrics("trainer")
    assert table.column("step").to_pylist() == [1, 2, 3, 4, 5, 6]
    attempts = {1: 1, 2: 1, 3: 2, 4: 2, 5: 1, 6: 1}
    assert table.column("loss").to_pylist() == [loss(s, a) for s, a in attempts.items()]
    # every trained sample once: 6 steps x (5 + 3) samples, not 8 x 8
    for d, n in STALENESS.items():
        assert sum(table.column(f"staleness/{d}").to_pylist()) == 6 * n
    every = run.read_metrics("trainer", all_rows=True)  # the raw append order is still there
    assert every.column("step").to_pylist() == [1, 2, 3, 4, 5, 3, 4, 6]


def test_the_last_row_of_a_part_wins_and_later_parts_win_over_earlier(backend):
    run = _store(backend).run("r1", create=True)
    run.append_metrics("trainer", [trainer_row(2, 1), trainer_row(1, 1), trainer_row(2, 2)])
    run.append_metrics("trainer", [trainer_row(1, 3)])
    run.append_metrics("trainer", pa.table({"step": [1, 3], "loss": [loss(1, 4), loss(3, 1)]}))
    table = run.read_metrics("trainer")
    assert table.column("step").to_pylist() == [1, 2, 3]
    assert table.column("loss").to_pylist() == [loss(1, 4), loss(2, 2), loss(3, 1)]


def test_a_reevaluated_version_replaces_its_earlier_row(backend):
    run = _store(backend).run("r1", create=True)

    def rate(version: int, attempt: int) -> float:
        return version / 8 + attempt / 100

    for v in range(4):
        run.append_metrics("eval", [{"step": v, "version": v, "pass_rate": rate(v, 1)}])
    run.append_metrics("eval", [{"step": 2, "version": 2, "pass_rate": rate(2, 2)}])
    run.append_metrics("eval", [{"step": 0, "version": 0, "pass_rate": rate(0, 2)}])
    run.append_metrics("eval", [{"step": 4, "version": 4, "pass_rate": rate(4, 1)}])
    table = run.read_metrics("eval")
    assert table.column("version").to_pylist() == [0, 1, 2, 3, 4]
    assert table.column("pass_rate").to_pylist() == [
        rate(0, 2),
        rate(1, 1),
        rate(2, 2),
        rate(3, 1),
        rate(4, 1),
    ]
    assert run.read_metrics("eval", all_rows=True).num_rows == 7


def test_eval_rows_without_a_version_fall_back_to_their_step(backend):
    run = _store(backend).run("r1", create=True)
    run.append_metrics("eval", [{"step": 0, "pass_rate": 0.1}, {"step": 5, "pass_rate": 0.2}])
    run.append_metrics("eval", [{"step": 5, "version": 5, "pass_rate": 0.3}])
    table = run.read_metrics("eval")
    assert table.column("step").to_pylist() == [0, 5]
    assert table.column("pass_rate").to_pylist() == [0.1, 0.3]


def test_a_stream_without_a_key_keeps_every_row_in_append_order(backend):
    run = _store(backend).run("r1", create=True)
    rows = [{"step": 3, "A": 0.5}, {"step": 1, "A": 0.4}, {"step": 3, "A": 0.6}]
    for row in rows:
        run.append_metrics("scaling", [row])
    assert run.read_metrics("scaling").to_pylist() == rows
    run.append_metrics("trainer", [{"loss": 1.0}, {"loss": 1.0}])  # no step column
    assert run.read_metrics("trainer").to_pylist() == [{"loss": 1.0}, {"loss": 1.0}]


def test_rows_with_a_null_key_are_kept_after_the_keyed_ones():
    table = pa.table({"step": [2, None, 1, 2, None], "x": [1, 2, 3, 4, 5]})
    out = latest_metrics("trainer", table)
    assert out.to_pylist() == [
        {"step": 1, "x": 3},
        {"step": 2, "x": 4},
        {"step": None, "x": 2},
        {"step": None, "x": 5},
    ]
    assert latest_metrics("trainer", table.slice(0, 0)).num_rows == 0
    assert latest_metrics("other", table) is table
    ordered = pa.table({"step": [1, 2, 3], "x": [1, 2, 3]})
    assert latest_metrics("trainer", ordered).equals(ordered)


def test_a_large_stream_is_deduplicated_by_arrow():
    """100,000 steps written twice, the second time in reverse: 100,000 rows of the second."""
    n = 100_000
    steps = list(range(1, n + 1))
    table = pa.table({"step": steps + steps[::-1], "attempt": [1] * n + [2] * n})
    out = latest_metrics("trainer", table)
    assert out.column("step").to_pylist() == steps
    assert set(out.column("attempt").to_pylist()) == {2}


def test_sql_and_verify_see_one_row_per_step(tmp_path):
    run = open_store(str(tmp_path / "runs")).run("r1", create=True)
    _redone_trainer(run)
    with RolloutQuery(run) as q:
        rows = q.sql("SELECT count(*) AS n, sum(loss) AS total FROM metrics_trainer").to_pylist()
    attempts = {1: 1, 2: 1, 3: 2, 4: 2, 5: 1, 6: 1}
    assert rows == [{"n": 6, "total": sum(loss(s, a) for s, a in attempts.items())}]
    report = verify_run(run)
    assert report.facts["trainer_steps_redone"] == 2
    assert report.facts["trainer_rows_replaced"] == 2
    assert any("2 trainer step(s) were trained again" in n for n in report.notes)
