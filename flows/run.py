"""The ScaleRL run: prepare -> generators + trainer running side by side -> per-shard stages ->
evaluations -> scaling fit -> report. The flow a Prefect deployment schedules from the UI.

    from flows.run import scalerl_run
    scalerl_run(load_config(preset="tiny-cpu"))          # or: scalerl run --preset tiny-cpu

Generators and the trainer are persistent tasks (each supervising its own process); the flow
itself moves every newly committed raw shard through score -> curriculum -> filter (in commit
order, so the curriculum sees one writer; three task runs per shard, or one advance-shard
task run with pipeline.stage_tasks = per_shard; with stream, one persistent advance-stream task
runs the stages for the whole run and the loop only supervises), evaluates every `evaluation.every_steps`
versions, and keeps the progress and metrics artifacts current. It ends when the trainer ends (max steps, compute budget,
or no more prompts), then marks the run finished, which stops the generators.

Resume: call it again with the same run_id (`scalerl resume RUN_ID`, or Prefect's retry of the
flow run). Every stage skips what is committed, the trainer restarts from its last checkpoint,
and the curriculum continues from its committed state.
"""

from __future__ import annotations

import time
from concurrent import futures

from prefect import flow, get_run_logger
from prefect.utilities.annotations import quote

from scalerl.config import RunConfig
from scalerl.faults import kill_point
from tasks.common import open_run
from tasks.evaluate import evaluate_policy
from tasks.isolated import in_process, start_server, wait_for_activity
from tasks.prepare import prepare_run
from tasks.report import (
    publish_metrics_table,
    publish_run_report,
    render_plots,
    set_progress,
    start_progress,
)
from tasks.rollouts import generate_rollouts
from tasks.scaling import fit_scaling_curve
from tasks.stages import (
    STAGES,
    advance_shard,
    advance_stream,
    end_stream,
    open_stream,
    pending_keys,
)
from tasks.train import train_policy

POLL_MIN_S, POLL_MAX_S = 0.05, 1.0  # idle polling backs off from MIN to MAX, reset on work
TABLE_EVERY_S = 15.0  # the metrics table artifact reads every trainer part file: not per shard
PROGRESS_EVERY_S = 1.0  # progress artifact updates are API calls: at most this often
STREAM_SUPERVISE_S = 0.5  # stage_tasks = stream: the loop only supervises, off the critical path


def advance_shards(config: RunConfig, run_id: str) -> int:
    """Score, filter and fold into the curriculum every raw shard not yet through; returns how many."""
    todo = pending_keys(open_run(config, run_id))
    # quote: Prefect would otherwise walk the whole config (a pydantic tree) looking for futures
    # on every call, three calls per shard
    quoted = quote(config)
    per_shard = config.pipeline.stage_tasks != "per_stage"  # stream: the final drain only
    for key in todo:
        if per_shard:  # the same three stages in one task run
            advance_shard(quoted, run_id, key)
            continue
        for _, stage in STAGES:  # the order advance_shard runs them in, as three task runs
            if "quarantined" in stage(quoted, run_id, key):
                break  # its input was unusable and is in quarantine: the key goes no further
    return len(todo)


def due_versions(run, every: int, done) -> list[int]:
    """Committed weight versions that are multiples of `every`, up to the latest, not in `done`.
    From the LATEST pointer and one manifest read per candidate: the loop asks every second, and
    listing every version (one read per manifest) grew with the run, on S3 by a request each."""
    latest = run.latest_weights_version()
    if latest is None:
        return []
    return [v for v in range(0, latest + 1, every) if v not in done and run.has_weights(v)]


def evaluate_due(config: RunConfig, run_id: str, done: dict, *, wait: bool = False) -> None:
    """Evaluate every published version that is a multiple of evaluation.every_steps.

    Evaluations run beside the loop (submitted to the flow's task runner) so the stages keep
    feeding the trainer meanwhile, one at a time (they share one engine); `done` maps version
    -> its future (None once finished and checked). A failed evaluation raises here, on the
    loop's next look; `wait` blocks until every due version is evaluated."""
    due = due_versions(open_run(config, run_id), config.evaluation.every_steps, done)
    while True:
        for version, future in list(done.items()):
            if future is not None and future.wrapped_future.done():
                future.result()  # raises the evaluation's error
                done[version] = None  # checked
        running = [f for f in done.values() if f is not None]
        if due and not running:  # one at a time: evaluations share one engine
            version = due.pop(0)
            done[version] = evaluate_policy.submit(quote(config), run_id, version)
            continue
        if not wait or (not due and not running):
            return
        if running:
            running[0].wait()


def stop_generators_if_done(run, generators) -> None:
    """Tell the trainer no more data is coming once every generator has ended (all prompts
    retired) or one has failed; it then stops instead of waiting for shards."""
    if (run.read_status() or {}).get("state") != "running":
        return
    # a running future's .state is an API call; a finished one's is local
    ended = [g for g in generators if g.wrapped_future.done() and g.state.is_final()]
    if any(not g.state.is_completed() for g in ended):
        run.write_status({"state": "failed", "reason": "a generator failed; see its task run"})
    elif generators and len(ended) == len(generators):
        run.write_status(
            {"state": "exhausted", "reason": "every generator ended (prompts retired)"}
        )


def _supervise(config, run_id, run, progress, generators, trainer, evaluated, stream) -> dict:
    """The loop of scalerl_run while the trainer runs; returns the trainer's summary. `stream`:
    the advance-stream task's future (pipeline.stage_tasks = stream), else None and the loop
    moves the shards through the stages itself."""
    poll, shown_step, table_at, shown_at = POLL_MIN_S, -1, time.monotonic(), 0.0
    while not trainer.wrapped_future.done():  # (.state would be an API call per loop)
        kill_point("flow.loop")
        if stream is None:
            moved = advance_shards(config, run_id)
        else:
            moved = True  # the stream task moves them
            if stream.wrapped_future.done() and stream.state.is_failed():
                stream.result()  # raises its error: the stages cannot go on, so neither can the run
        stop_generators_if_done(run, generators)
        step = run.latest_weights_version() or 0
        if step != shown_step and time.monotonic() - shown_at >= PROGRESS_EVERY_S:
            evaluate_due(config, run_id, evaluated)
            quarantined = len(run.quarantined_keys())
            set_progress(progress, step, config.schedule.max_steps, quarantined, run_id)
            shown_step, shown_at = step, time.monotonic()
        if moved and time.monotonic() - table_at >= TABLE_EVERY_S:
            publish_metrics_table(config, run_id)
            table_at = time.monotonic()
        if stream is not None:  # nothing on the critical path here: look twice a second
            futures.wait(  # (a stream that returned because the run failed is not waited on)
                [f for f in (trainer.wrapped_future, stream.wrapped_future) if not f.done()],
                timeout=STREAM_SUPERVISE_S,
                return_when=futures.FIRST_COMPLETED,
            )
            continue
        # The stages sit on the critical path between generator and trainer: a generator's
        # commit wakes the loop at once (tasks.isolated.notify_flow); otherwise it polls, fast
        # while shards flow and backing off while idle, so an idle run does not hammer S3.
        poll = POLL_MIN_S if moved else min(2 * poll, POLL_MAX_S)
        if not moved:
            wait_for_activity(poll)
    try:
        summary = trainer.result()
    finally:
        status = run.read_status() or {}
        if status.get("state") == "running":
            run.write_status({"state": "stopping", "reason": "trainer ended"})
        for g in generators:
            g.wait()
        if stream is None:
            advance_shards(config, run_id)  # shards committed while the generators wound down
        else:
            end_stream(run_id)  # the stream drains what the generators committed, then returns
            stream.wait()
    if stream is not None:
        stream.result()  # its failure fails the run (after the trainer's, which comes first)
    return summary


@flow(name="scalerl-run", log_prints=True)
def scalerl_run(config: RunConfig, run_id: str | None = None) -> dict:
    """Run (or resume) the whole ScaleRL pipeline for `config`; returns the run summary."""
    logger = get_run_logger()
    if not in_process(config):
        start_server()  # generator and trainer processes fork from it; imports overlap prepare
    run_id = prepare_run(config, run_id)
    progress = start_progress(run_id, config.schedule.max_steps)
    if in_process(config):
        # transformers' first import is not thread-safe (its lazy module: two threads that
        # import it at once get "cannot import name 'AutoModelForCausalLM'"), and the
        # generators and the trainer below would each import it first on their own thread.
        import transformers  # noqa: F401

    generators = [
        generate_rollouts.submit(config, run_id, f"gen{i}")
        for i in range(config.generation.num_generators)
    ]
    trainer = train_policy.submit(config, run_id)
    stream = None
    if config.pipeline.stage_tasks == "stream":
        open_stream(run_id)
        stream = advance_stream.submit(quote(config), run_id)
    run, evaluated = open_run(config, run_id), {}
    try:
        summary = _supervise(config, run_id, run, progress, generators, trainer, evaluated, stream)
    except BaseException as exc:
        # The generators and the trainer run until the run's status leaves "running": without
        # this, a failing flow would wait on them forever. Resuming sets it back to running.
        if (run.read_status() or {}).get("state") == "running":
            run.write_status({"state": "failed", "reason": f"the run flow failed: {exc!r}"[:500]})
        end_stream(run_id)
        raise
    evaluate_due(config, run_id, evaluated, wait=True)  # versions published meanwhile
    final = run.latest_weights_version() or 0
    if final not in evaluated:
        evaluate_policy(quote(config), run_id, final)
    fit = fit_scaling_curve(config, run_id)
    run.write_status(
        {
            "state": "finished",
            "reason": summary.get("reason", ""),
            "step": summary.get("step", final),
        }
    )
    set_progress(progress, config.schedule.max_steps, config.schedule.max_steps)
    publish_metrics_table(config, run_id)
    plots = render_plots(config, run_id, fit)
    publish_run_report(config, run_id, {**summary, "state": "finished"}, fit, plots)
    logger.info(
        "run %s finished at step %s: %s", run_id, summary.get("step"), summary.get("reason")
    )
    return {"run_id": run_id, **summary, "fit": fit, "plots": plots}
