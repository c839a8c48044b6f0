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

Resume: call it again with the same config.storage.run_id (`scalerl resume RUN_ID`, the
scalerl-resume deployment, or Prefect's Retry of the flow run, which finds the run its first
attempt started from the flow run's tag even when no run id was given). Every stage skips what is committed, the trainer restarts from its last checkpoint,
and the curriculum continues from its committed state.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from concurrent import futures

from prefect import flow, get_run_logger
from prefect.utilities.annotations import quote

from runtime.common import open_run, with_run_id
from runtime.isolated import (
    in_process,
    reopen_children,
    start_server,
    stop_children,
    wait_for_activity,
)
from runtime.transports import end_of_run, published_version
from runtime.writer import hold_run
from scalerl.config import RunConfig
from scalerl.faults import kill_point
from scalerl.stall import RunStalledError
from storage.lease import LeaseLostError
from tasks.evaluate import evaluate_policy
from tasks.flow_runs import (
    claimed_run_id,
    crash_leftovers,
    current_flow_run_id,
    label_flow_run,
    record_flow_run,
)
from tasks.generator_pool import GeneratorPool
from tasks.prepare import prepare_run
from tasks.report import (
    latest_pass_rate,
    publish_metrics_table,
    publish_run_report,
    render_plots,
    set_progress,
    start_progress,
)
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
from tasks.trainer_nodes import LocalTrainer, RemoteTrainer

POLL_MIN_S, POLL_MAX_S = 0.05, 1.0  # idle polling backs off from MIN to MAX, reset on work
TABLE_EVERY_S = 15.0  # the metrics table artifact reads every trainer part file: not per shard
PROGRESS_EVERY_S = 1.0  # progress artifact updates are API calls: at most this often
PLOTS_EVERY_S = 30.0  # in-run plot artifacts: after a new evaluation, at most this often
STREAM_SUPERVISE_S = 0.5  # stage_tasks = stream: the loop only supervises, off the critical path


class RunFailedError(RuntimeError):
    """A part of the run failed for good (the trainer stopped because of it)."""


REMOTE_WAIT_S = 300.0  # remote generators end within seconds of the status change; a lost
# machine's flow run may never end: the run does not wait on it longer than this


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


MAX_EVAL_SLOTS = 4


def evaluation_slots(config: RunConfig, *, training_done: bool) -> int:
    """Evaluations at once. One while the run trains: they are niced and yield the CPU to it,
    and on a GPU each holds an engine of evaluation.gpu_memory_utilization. Once training has
    ended, CPU evaluations in their own processes (transformers engine, placement.accelerator
    cpu) run on the cores this process may use, pipeline.torch_threads each, at most
    MAX_EVAL_SLOTS (each loads its own copy of the model): the tiny-cpu demo ended with ~35 s
    of queued evaluations on one core of two. Unset torch_threads: each uses every core."""
    import os

    from runtime.generation import engine_kind
    from runtime.isolated import in_process

    threads = config.pipeline.torch_threads
    if (
        not training_done
        or not threads
        or in_process(config)
        or not engine_kind(config).cpu_parallel_evaluations
        or config.placement.accelerator != "cpu"
    ):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_EVAL_SLOTS, (cores or 1) // threads))


def evaluate_due(config: RunConfig, run_id: str, done: dict, *, wait: bool = False) -> int:
    """Evaluate every published version that is a multiple of evaluation.every_steps.

    Evaluations run beside the loop (submitted to the flow's task runner) so the stages keep
    feeding the trainer meanwhile, one at a time while it trains (evaluation_slots); `done` maps
    version -> its future (None once finished and checked). A failed evaluation raises here, on
    the loop's next look; `wait` (training has ended) blocks until every due version is
    evaluated. Returns how many evaluations finished since the last call."""
    due = due_versions(open_run(config, run_id), config.evaluation.every_steps, done)
    slots = evaluation_slots(config, training_done=wait)
    finished = 0
    while True:
        for version, future in list(done.items()):
            if future is not None and future.wrapped_future.done():
                try:
                    future.result()  # raises the evaluation's error
                except BaseException:
                    # the others end before the flow fails: no evaluation writes after it
                    others = [f.wrapped_future for f in done.values() if f not in (None, future)]
                    futures.wait(others)
                    raise
                done[version] = None  # checked
                finished += 1
        running = [f for f in done.values() if f is not None]
        if due and len(running) < slots:
            version = due.pop(0)
            done[version] = evaluate_policy.submit(quote(config), run_id, version)
            continue
        if not wait or (not due and not running):
            return finished
        if running:
            futures.wait([f.wrapped_future for f in running], return_when=futures.FIRST_COMPLETED)


_stop_reason: list[str] = []  # request_stop() appends; the loop of a running flow reads it
# Set by flows/cli_signals.graceful_stop: the CLI's SIGTERM handler, which the flow puts back
# after Prefect's engine replaced it with its own (which would end the run abruptly).
stop_signal_handler = None


def request_stop(reason: str) -> None:
    """Ask the run flow of this process to stop (e.g. on SIGINT/SIGTERM): its loop sets the
    status to stopping, the trainer checkpoints and ends, the generators end, and the flow
    returns with state "stopped" (resumable). Safe to call from a signal handler."""
    _stop_reason.append(reason)


def _supervise(
    config, run_id, run, progress, generators, trainer, evaluated, stream, writer
) -> dict:
    """The loop of scalerl_run while the trainer runs; returns the trainer's summary. `stream`:
    the advance-stream task's future (pipeline.stage_tasks = stream), else None and the loop
    moves the shards through the stages itself. Stops early when request_stop() was called
    (the summary then carries "stopped": the reason) and fails if the run was taken over."""
    _stop_reason.clear()
    stopped = None
    poll, shown_step, table_at, shown_at = POLL_MIN_S, -1, time.monotonic(), 0.0
    plots, plots_at, plots_due, held_out = None, 0.0, False, None
    while not trainer.done():  # (a task run's .state would be an API call per loop)
        kill_point("flow.loop")
        writer.check()  # LeaseLostError: another writer took the run over; stop writing
        if _stop_reason and stopped is None:
            stopped = _stop_reason[0]
            run.write_status({"state": "stopping", "reason": stopped})  # the trainer ends
        if stream is None:
            moved = advance_shards(config, run_id)
        else:
            moved = True  # the stream task moves them
            if stream.wrapped_future.done() and stream.state.is_failed():
                stream.result()  # raises its error: the stages cannot go on, so neither can the run
        generators.check(run)  # lost ones replaced; all ended (prompts retired): exhausted
        step = published_version(run, config) or 0
        if step != shown_step and time.monotonic() - shown_at >= PROGRESS_EVERY_S:
            if evaluate_due(config, run_id, evaluated):
                plots_due, held_out = True, latest_pass_rate(run)
            quarantined = len(run.quarantined_keys())
            set_progress(progress, step, config.schedule.max_steps, quarantined, run_id, held_out)
            shown_step, shown_at = step, time.monotonic()
        if moved and time.monotonic() - table_at >= TABLE_EVERY_S:
            publish_metrics_table(config, run_id)
            table_at = time.monotonic()
        # Pictures in the UI while the run goes: after a new evaluation, beside the loop, one
        # rendering at a time and at most every PLOTS_EVERY_S (matplotlib costs the flow CPU).
        idle = plots is None or plots.wrapped_future.done()
        if plots_due and idle and time.monotonic() - plots_at >= PLOTS_EVERY_S:
            plots = render_plots.submit(quote(config), run_id, None)
            plots_due, plots_at = False, time.monotonic()
        if stream is not None:  # nothing on the critical path here: look twice a second
            running = [
                f
                for f in (trainer.wrapped_future, stream.wrapped_future)
                if f is not None and not f.done()
            ]
            if not running:  # a remote trainer has no future here
                time.sleep(STREAM_SUPERVISE_S)
                continue
            futures.wait(  # (a stream that returned because the run failed is not waited on)
                running,
                timeout=STREAM_SUPERVISE_S,
                return_when=futures.FIRST_COMPLETED,
            )
            continue
        # The stages sit on the critical path between generator and trainer: a generator's
        # commit wakes the loop at once (runtime.isolated.notify_flow); otherwise it polls, fast
        # while shards flow and backing off while idle, so an idle run does not hammer S3.
        poll = POLL_MIN_S if moved else min(2 * poll, POLL_MAX_S)
        if not moved:
            wait_for_activity(poll)
    if plots is not None:
        plots.wait()  # the final rendering must come last
    try:
        summary = trainer.result()
    finally:
        status = run.read_status() or {}
        if status.get("state") == "running":
            run.write_status({"state": "stopping", "reason": "trainer ended"})
        generators.wait(None if not generators.remote else REMOTE_WAIT_S)
        if stream is None:
            advance_shards(config, run_id)  # shards committed while the generators wound down
        else:
            end_stream(run_id)  # the stream drains what the generators committed, then returns
            stream.wait()
    if stream is not None:
        stream.result()  # its failure fails the run (after the trainer's, which comes first)
    return {**summary, "stopped": stopped} if stopped else summary


@flow(name="scalerl-run", log_prints=True)
def scalerl_run(config: RunConfig) -> dict:
    """Run (or resume) the whole ScaleRL pipeline for `config`; returns the run summary.

    The run id is config.storage.run_id; when unset, a Retry of this flow run resumes the run
    its first attempt started (found by the flow run's tag), else a new id is made."""
    logger = get_run_logger()
    if stop_signal_handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop_signal_handler)  # a clean stop, as for Ctrl-C
    reopen_children()
    if not in_process(config):
        start_server()  # generator and trainer processes fork from it; imports overlap prepare
    run_id = claimed_run_id(config.storage.run_id)
    config = with_run_id(config, run_id)
    label_flow_run(run_id)  # before anything is written: a crash from here on is retryable
    run_id = prepare_run(config, run_id)  # refuses another config under an existing run id
    writer = hold_run(open_run(config, run_id), current_flow_run_id())  # one writer per run
    try:
        return _run_held(config, run_id, writer, logger)
    finally:
        writer.release()


def _run_held(config: RunConfig, run_id: str, writer, logger) -> dict:
    """The run, once this flow run is its one writer."""
    crash_leftovers(run_id)  # task runs an earlier, killed attempt left "Running" in the UI
    run = open_run(config, run_id)
    record_flow_run(run)
    progress = start_progress(run_id, config.schedule.max_steps)
    if in_process(config):
        # transformers' first import is not thread-safe (its lazy module: two threads that
        # import it at once get "cannot import name 'AutoModelForCausalLM'"), and the
        # generators and the trainer below would each import it first on their own thread.
        import transformers  # noqa: F401

    generators = GeneratorPool(config, run_id)  # here, or child flow runs on a work pool
    generators.start()
    if config.placement.trainer_deployment is None:
        trainer = LocalTrainer(train_policy.submit(config, run_id))
    else:  # one child flow run per node, on the deployment's work pool
        trainer = RemoteTrainer(config, run_id)
        trainer.start()
    stream = None
    if config.pipeline.stage_tasks == "stream":
        open_stream(run_id)
        stream = advance_stream.submit(quote(config), run_id)
    evaluated = {}
    try:
        summary = _supervise(
            config, run_id, run, progress, generators, trainer, evaluated, stream, writer
        )
    except BaseException as exc:
        # The generators and the trainer run until the run's status leaves "running": without
        # this, a failing flow would wait on them forever. Resuming sets it back to running.
        # (Not when the run was taken over: it belongs to its new writer.) When the status
        # cannot be written (e.g. the disk is full), the children cannot learn of the failure
        # from the store: they are stopped directly, so nothing waits on them forever.
        try:
            if (run.read_status() or {}).get("state") == "running":
                run.write_status(
                    {"state": "failed", "reason": f"the run flow failed: {exc!r}"[:500]}
                )
        except LeaseLostError:
            pass
        except Exception as status_error:  # noqa: BLE001 - the original error is the one to show
            logger.error("could not record the failure in the store (%s)", status_error)
            stop_children()
        finally:
            end_stream(run_id)
            for remote in (generators, trainer):  # roles on other machines: stopped now
                with contextlib.suppress(Exception):
                    remote.cancel()
            if not isinstance(exc, LeaseLostError):  # (a run taken over is its new writer's)
                end_of_run(config, run)  # memory under /dev/shm; resume uses the store
        raise
    failed = run.read_status() or {}
    if failed.get("state") == "failed":  # e.g. every replacement of a generator was lost too
        end_of_run(config, run)
        raise RunFailedError(
            f"run {run_id} failed: {failed.get('reason')}. Fix: see the failed task or flow "
            f"runs; then `scalerl resume {run_id}` continues from what is committed."
        )
    if summary.get("stalled"):  # it cannot learn: say why, and do not evaluate or fit
        end_of_run(config, run)
        run.write_status(
            {"state": "stalled", "reason": summary["stalled"], "step": summary.get("step")}
        )
        raise RunStalledError(f"run {run_id} stalled: {summary['stalled']}")
    if summary.get("stopped"):  # a stop was asked for (a signal): no final evaluation or fit
        run.write_status(
            {"state": "stopped", "reason": summary["stopped"], "step": summary.get("step")}
        )
        logger.info(
            "run %s stopped at step %s: %s", run_id, summary.get("step"), summary["stopped"]
        )
        end_of_run(config, run)
        return {"run_id": run_id, **summary, "state": "stopped", "fit": None, "plots": {}}
    evaluate_due(config, run_id, evaluated, wait=True)  # versions published meanwhile
    final = run.latest_weights_version() or 0
    if final not in evaluated:
        evaluate_policy(quote(config), run_id, final)
    end_of_run(config, run)  # the store holds the final version (its checkpoint's)
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
