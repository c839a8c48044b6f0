"""Progress bars for `scalerl run` / `scalerl resume` on a terminal: trainer steps, generated
shards and evaluations, read from the run store while the flow runs (plain Prefect log lines
otherwise)."""

from __future__ import annotations

import contextlib
import sys
import threading


@contextlib.contextmanager
def run_progress(config, run_id: str, poll_s: float = 1.0):
    """Show live bars while the body runs, when stdout is a terminal (yields the rich Progress);
    otherwise do nothing (yields None)."""
    if not sys.stdout.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from runtime.common import open_run

    stop = threading.Event()
    sets = max(1, len(config.evaluation.set_names(config.data.num_eval_prompts)))
    bars = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    )
    steps = bars.add_task("training steps", total=config.schedule.max_steps)
    shards = bars.add_task("generated shards", total=None)
    evals = bars.add_task(
        "evaluations", total=config.schedule.max_steps // config.evaluation.every_steps + 1
    )

    def poll() -> None:
        run = None
        while not stop.wait(poll_s):
            try:
                run = run or open_run(config, run_id)
                bars.update(steps, completed=run.latest_weights_version() or 0)
                bars.update(shards, completed=run.count_shards("raw"))
                # one eval shard per evaluation set per version
                bars.update(evals, completed=run.count_shards("eval") // sets)
            except Exception:  # the run directory may not exist yet; the flow reports real errors
                continue

    thread = threading.Thread(target=poll, name="scalerl-progress", daemon=True)
    with bars:
        thread.start()
        try:
            yield bars
        finally:
            stop.set()
            thread.join(timeout=5)
