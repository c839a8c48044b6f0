"""The ScaleRL run, as its pipeline diagram: prepare -> generators + trainer + stages running side
by side, supervised by one loop -> final evaluations -> scaling fit -> report. The flow a Prefect
deployment schedules from the UI.

    from flows.run import scalerl_run
    scalerl_run(load_config(preset="tiny-cpu"))          # or: scalerl run --preset tiny-cpu

Its parts are strategies chosen once from the config, so the flow reads the same whatever they
are: the generators and the trainer are roles (tasks/roles.py: here as task runs, each
supervising its own process, or elsewhere as flow runs on a work pool); the stages (score ->
curriculum -> filter, in commit order) are driven by the driver of pipeline.stage_tasks
(tasks/stage_drivers.py: three task runs per shard, one per shard, or one persistent
advance-stream task run). The loop evaluates every `evaluation.every_steps` versions and keeps
the progress, metrics and plots artifacts current. It ends when the trainer ends (max steps,
compute budget, or no more prompts), then marks the run finished, which stops the generators.
The trackers of config.tracking (MLflow, TensorBoard, W&B) are fed by one thread of this
process that tails the store (runtime/tracking/), from the time the run is held to a last pass
before it is released.

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
from dataclasses import dataclass, field

from prefect import flow, get_run_logger
from prefect.utilities.annotations import quote

from runtime.common import open_run, with_run_id
from runtime.isolated import in_process, reopen_children, start_server, stop_children
from runtime.tracking.mirror import start_mirror
from runtime.transports import end_of_run, published_version
from runtime.writer import RunWriter, hold_run
from scalerl.config import RunConfig
from scalerl.faults import kill_point
from scalerl.stall import RunStalledError
from storage import Run
from storage.errors import RunDeletedError, StoreError
from storage.fsio import run_deleted
from storage.lease import LeaseLostError
from tasks.evaluate import evaluate_policy
from tasks.flow_runs import (
    claimed_run_id,
    crash_leftovers,
    current_flow_run_id,
    label_flow_run,
    record_flow_run,
)
from tasks.generator_pool import make_generators
from tasks.prepare import prepare_run
from tasks.report import (
    latest_pass_rate,
    publish_metrics_table,
    publish_run_report,
    render_plots,
    set_progress,
    start_progress,
)
from tasks.roles import Role, TaskRun, wait_all, wait_first
from tasks.scaling import fit_scaling_curve
from tasks.stage_drivers import StageDriver, make_stage_driver
from tasks.trainer_nodes import make_trainer

TABLE_EVERY_S = 15.0  # the metrics table artifact reads every trainer part file: not per shard
PROGRESS_EVERY_S = 1.0  # progress artifact updates are API calls: at most this often
PLOTS_EVERY_S = 30.0  # in-run plot artifacts: after a new evaluation, at most this often


class RunFailedError(RuntimeError):
    """A part of the run failed for good (the trainer stopped because of it)."""


@dataclass
class Pipeline:
    """The parts of a run the flow supervises, made and started by _run_held."""

    config: RunConfig
    run: Run  # the flow's open run, under its writer's lease
    writer: RunWriter
    progress: object  # the progress artifact's id
    generators: Role
    trainer: Role
    stages: StageDriver
    evaluated: dict = field(default_factory=dict)  # version -> its evaluation (None: checked)


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


def evaluate_due(config: RunConfig, run: Run, done: dict, *, wait: bool = False) -> int:
    """Evaluate every published version that is a multiple of evaluation.every_steps.

    Evaluations run beside the loop (submitted to the flow's task runner) so the stages keep
    feeding the trainer meanwhile, one at a time while it trains (evaluation_slots); `done` maps
    version -> its evaluation (a TaskRun; None once finished and checked). A failed evaluation
    raises here, on the loop's next look; `wait` (training has ended) blocks until every due
    version is evaluated. Returns how many evaluations finished since the last call."""
    due = due_versions(run, config.evaluation.every_steps, done)
    slots = evaluation_slots(config, training_done=wait)
    finished = 0
    while True:
        for version, evaluation in list(done.items()):
            if evaluation is not None and evaluation.done():
                try:
                    evaluation.result()  # raises the evaluation's error
                except BaseException:
                    # the others end before the flow fails: no evaluation writes after it
                    wait_all([e for e in done.values() if e not in (None, evaluation)])
                    raise
                done[version] = None  # checked
                finished += 1
        running = [e for e in done.values() if e is not None]
        if due and len(running) < slots:
            version = due.pop(0)
            done[version] = TaskRun(evaluate_policy.submit(quote(config), run.run_id, version))
            continue
        if not wait or (not due and not running):
            return finished
        if running:
            wait_first([e.waitable for e in running])


_stop_reason: list[str] = []  # request_stop() appends; the loop of a running flow reads it
# Set by flows/cli_signals.graceful_stop: the CLI's SIGTERM handler, which the flow puts back
# after Prefect's engine replaced it with its own (which would end the run abruptly).
stop_signal_handler = None


def request_stop(reason: str) -> None:
    """Ask the run flow of this process to stop (e.g. on SIGINT/SIGTERM): its loop sets the
    status to stopping, the trainer checkpoints and ends, the generators end, and the flow
    returns with state "stopped" (resumable). Safe to call from a signal handler. A request
    made before the loop starts (during prepare) holds until clear_stop()."""
    _stop_reason.append(reason)


def clear_stop() -> None:
    """Forget stop requests (flows/cli_signals.py, before and after the flow it guards)."""
    _stop_reason.clear()


_writing: list[tuple[Run, RunWriter]] = []  # the run this process's flow holds (hard_stop)


def hard_stop(reason: str) -> dict | None:
    """A stop that did not end within its grace period (flows/cli_signals.py): kill the run's
    processes here, and mark the run this process writes "stopped" at its newest committed
    checkpoint (what `scalerl resume` continues from), then free its lease; the caller exits the
    process next. From any thread. Returns the status written (with "run_id"), or None: no run
    held here, or it has ended or been taken over meanwhile (its status stands)."""
    stop_children(grace_s=1.0)
    if not _writing:
        return None
    run, writer = _writing[-1]
    writer.check()  # LeaseLostError: taken over, not ours to mark
    if (run.read_status() or {}).get("state") not in ("running", "stopping"):
        return None
    status = {"state": "stopped", "reason": reason, "step": run.latest_checkpoint_step()}
    run.write_status(status)
    with contextlib.suppress(Exception):
        writer.release()
    return {**status, "run_id": run.run_id}


class _RunPage:
    """What the run shows in the UI while it goes, each at its own cadence: the progress bar
    (with the evaluations each newly published version makes due), the metrics table, and the
    plots after a new evaluation."""

    def __init__(self, parts: Pipeline) -> None:
        self.parts = parts
        self.shown_step, self.shown_at, self.held_out = -1, 0.0, None
        self.looked_at = 0.0
        self.table_at = time.monotonic()
        self.plots, self.plots_at, self.plots_due = None, 0.0, False

    def update(self, moved: bool) -> None:
        """One look of the loop; `moved`: shards went through the stages since the last."""
        config, run = self.parts.config, self.parts.run
        # the loop looks several times a second: the weights pointer (a store read) only as
        # often as the progress may change
        now = time.monotonic()
        due = now - max(self.shown_at, self.looked_at) >= PROGRESS_EVERY_S
        step = (published_version(run, config) or 0) if due else self.shown_step
        self.looked_at = now if due else self.looked_at
        if step != self.shown_step and now - self.shown_at >= PROGRESS_EVERY_S:
            if evaluate_due(config, run, self.parts.evaluated):
                self.plots_due, self.held_out = True, latest_pass_rate(run)
            max_steps, quarantined = config.schedule.max_steps, len(run.quarantined_keys())
            set_progress(
                self.parts.progress, step, max_steps, quarantined, run.run_id, self.held_out
            )
            self.shown_step, self.shown_at = step, time.monotonic()
        if moved and time.monotonic() - self.table_at >= TABLE_EVERY_S:
            publish_metrics_table(config, run.run_id)
            self.table_at = time.monotonic()
        # Pictures in the UI while the run goes: after a new evaluation, beside the loop, one
        # rendering at a time and at most every PLOTS_EVERY_S (matplotlib costs the flow CPU).
        idle = self.plots is None or self.plots.done()
        if self.plots_due and idle and time.monotonic() - self.plots_at >= PLOTS_EVERY_S:
            self.plots = TaskRun(render_plots.submit(quote(config), run.run_id, None))
            self.plots_due, self.plots_at = False, time.monotonic()

    def finish(self) -> None:
        if self.plots is not None:
            self.plots.wait()  # the final rendering must come last


def _supervise(parts: Pipeline) -> dict:
    """The loop of scalerl_run while the trainer runs; returns the trainer's summary. Stops
    early when request_stop() was called (the summary then carries "stopped": the reason) and
    fails if the run was taken over."""
    page, stopped = _RunPage(parts), None
    while not parts.trainer.done():  # (a task run's .state would be an API call per loop)
        kill_point("flow.loop")
        parts.writer.check()  # LeaseLostError: another writer took the run over; stop writing
        if _stop_reason and stopped is None:
            stopped = _stop_reason[0]
            parts.run.write_status({"state": "stopping", "reason": stopped})  # the trainer ends
        moved = parts.stages.advance(parts.run)
        parts.generators.check()  # lost ones replaced; all ended (prompts retired): exhausted
        page.update(moved)
        parts.stages.wait(moved, parts.trainer)
    page.finish()
    try:
        summary = parts.trainer.result()
    finally:
        if (parts.run.read_status() or {}).get("state") == "running":
            parts.run.write_status({"state": "stopping", "reason": "trainer ended"})
        parts.generators.wait_for_end()  # remote ones: a deadline, then cancelled
        parts.stages.drain(parts.run)  # shards committed while the generators wound down
    parts.stages.finish()  # its failure fails the run (after the trainer's, which comes first)
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
    run = open_run(config, run_id)  # the flow's one handle on the run from here on
    writer = hold_run(run, current_flow_run_id())  # one writer per run
    _writing.append((run, writer))  # a stop past its grace period marks it (hard_stop)
    tracker = start_mirror(run, config.model_dump(mode="json"), logger)  # runtime/tracking/
    try:
        return _run_held(config, run, writer, logger)
    finally:
        _writing.remove((run, writer))
        if tracker is not None:
            tracker.stop()  # a last pass: the final metrics, plots and status
        writer.release()


def _run_held(config: RunConfig, run: Run, writer: RunWriter, logger) -> dict:
    """The run, once this flow run is its one writer."""
    crash_leftovers(run.run_id)  # task runs an earlier, killed attempt left "Running" in the UI
    record_flow_run(run)
    progress = start_progress(run.run_id, config.schedule.max_steps)
    if in_process(config):
        # transformers' first import is not thread-safe (its lazy module: two threads that
        # import it at once get "cannot import name 'AutoModelForCausalLM'"), and the
        # generators and the trainer below would each import it first on their own thread.
        import transformers  # noqa: F401

    parts = Pipeline(
        config,
        run,
        writer,
        progress,
        generators=make_generators(config, run),  # here, or child flow runs on a work pool
        trainer=make_trainer(config, run),  # here, or a child flow run per node
        stages=make_stage_driver(config, run),  # per pipeline.stage_tasks
    )
    parts.generators.start()
    parts.trainer.start()
    parts.stages.start()
    try:
        summary = _supervise(parts)
    except BaseException as exc:
        _wind_down_failed(parts, exc, logger)
        if _deleted_under_us(run, exc):  # a task found it gone before the heartbeat did
            raise run_deleted(None, run.url) from exc
        raise
    failed = run.read_status() or {}
    if failed.get("state") == "failed":  # e.g. every replacement of a generator was lost too
        end_of_run(config, run)
        raise RunFailedError(
            f"run {run.run_id} failed: {failed.get('reason')}. Fix: see the failed task or "
            f"flow runs; then `scalerl resume {run.run_id}` continues from what is committed."
        )
    if summary.get("stalled"):  # it cannot learn: say why, and do not evaluate or fit
        end_of_run(config, run)
        run.write_status(
            {"state": "stalled", "reason": summary["stalled"], "step": summary.get("step")}
        )
        raise RunStalledError(f"run {run.run_id} stalled: {summary['stalled']}")
    if summary.get("stopped"):  # a stop was asked for (a signal): no final evaluation or fit
        run.write_status(
            {"state": "stopped", "reason": summary["stopped"], "step": summary.get("step")}
        )
        logger.info(
            "run %s stopped at step %s: %s", run.run_id, summary.get("step"), summary["stopped"]
        )
        end_of_run(config, run)
        return {"run_id": run.run_id, **summary, "state": "stopped", "fit": None, "plots": {}}
    return _finish(parts, summary, logger)


def _deleted_under_us(run: Run, exc: BaseException) -> bool:
    """A task's failure while run.json is gone means the run's directory was deleted under
    the flow: say that (one line, RunDeletedError), not the task's own error (a RunNotFoundError
    "does not exist" as for a mistyped id, or a missing shard: advance-stream keeps its Run open
    across shards, so it meets the deletion as files gone rather than as a run not found)."""
    if isinstance(exc, RunDeletedError) or not isinstance(exc, StoreError):
        return False
    try:
        return run.created_at() is None
    except Exception:  # noqa: BLE001 - the original error is then the one to show
        return False


def _wind_down_failed(parts: Pipeline, exc: BaseException, logger) -> None:
    """The run flow failed with `exc`: stop every part of the run before it raises.

    The generators and the trainer run until the run's status leaves "running": without this,
    a failing flow would wait on them forever. Resuming sets it back to running. (Not when the
    run was taken over: it belongs to its new writer.) When the status cannot be written (e.g.
    the disk is full), or the run was deleted (RunDeletedError, or no status.json left), the
    children cannot learn of the failure from the store: they are stopped directly, so nothing
    waits on them forever."""
    run = parts.run
    try:
        status = None if isinstance(exc, RunDeletedError) else run.read_status()
        if status is None:  # the run was deleted (status.json with it): stop them directly
            stop_children()
        elif status.get("state") == "running":
            run.write_status({"state": "failed", "reason": f"the run flow failed: {exc!r}"[:500]})
    except LeaseLostError:
        pass
    except Exception as status_error:  # noqa: BLE001 - the original error is the one to show
        logger.error("could not record the failure in the store (%s)", status_error)
        stop_children()
    finally:
        parts.stages.close()
        for role in (parts.generators, parts.trainer):  # roles on other machines: stopped now
            with contextlib.suppress(Exception):
                role.cancel()
        if not isinstance(exc, LeaseLostError):  # (a run taken over is its new writer's)
            end_of_run(parts.config, run)  # memory under /dev/shm; resume uses the store


def _finish(parts: Pipeline, summary: dict, logger) -> dict:
    """Training has ended: evaluate what is still due and the final version, fit the scaling
    curve, mark the run finished, and publish the last artifacts and the run report."""
    config, run, run_id = parts.config, parts.run, parts.run.run_id
    evaluate_due(config, run, parts.evaluated, wait=True)  # versions published meanwhile
    final = run.latest_weights_version() or 0
    if final not in parts.evaluated:
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
    set_progress(parts.progress, config.schedule.max_steps, config.schedule.max_steps)
    publish_metrics_table(config, run_id)
    plots = render_plots(config, run_id, fit)
    publish_run_report(config, run_id, {**summary, "state": "finished"}, fit, plots)
    logger.info(
        "run %s finished at step %s: %s", run_id, summary.get("step"), summary.get("reason")
    )
    return {"run_id": run_id, **summary, "fit": fit, "plots": plots}
