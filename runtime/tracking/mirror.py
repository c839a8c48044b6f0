"""TrackerMirror: one logger that tails the run store into the configured experiment trackers.

    mirror = TrackerMirror(run, run.read_config())      # sinks from its `tracking` section
    mirror.start()          # a daemon thread: a pass every interval_s (flows/run.py)
    ...
    mirror.stop()           # a last pass, the run's final status as a tag, the sinks closed

    TrackerMirror(run, config, tracking=other).sync(final=True)   # `scalerl runs track`

Nothing in the hot path logs: trainers, generators and evaluations write the store as before
(metrics/, plots/, the eval stage), and this thread reads what is committed there, once per
pass: the metrics streams of storage.query.METRICS as Run.read_metrics gives them (one row per
trainer step, eval version, (set, version); the fits and prompt summaries in append order),
the plots (logged again when their bytes change) and, per evaluation shard, a sample table of
completions (prompt, completion, reward, finish_reason; texts cut at MAX_TEXT_CHARS). The
config goes in once as parameters (runtime/tracking/params.py: secrets redacted).

Resume: the progress lives in the run, in markers/tracking.json: per sink its tracker run id
and, per stream and group, the last step logged. A resumed or retried run (or a back-fill)
opens the SAME tracker run (MLflow run id, W&B id with resume="allow", TensorBoard's log dir,
purged past the recorded progress) and logs only rows past it, so no step is logged twice; a
step the trainer redoes after a resume was logged already and is skipped, as the store keeps
one row per step. The tracker run id is recorded before the first point is logged.

Failures never reach the run: a sink that raises is warned about once, with its fix, and
retried with exponential backoff (BACKOFF_S up to BACKOFF_MAX_S); the others go on. Nothing is
queued in memory (the store is the backlog, bounded by what the run committed). What a sink
has not logged when the mirror stops is counted, per sink, in the log and in the marker
("behind"), and `scalerl runs track RUN` back-fills it later.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
import threading
import time

from runtime.tracking.params import flat_params, redact_text
from runtime.tracking.sinks import make_sinks

MARKER = "tracking"
STREAMS = ("trainer", "eval", "eval_sets", "scaling", "prompts")  # storage.query.METRICS
PLOT_NAMES = ("curve", "lengths", "staleness")  # tasks/report.py draw_plots
KEYS = {"step", "version", "key", "set", "split", "run_id", "time"}  # axes, labels, the clock
SAMPLE_ROWS = 16  # completions per evaluation table
MAX_TEXT_CHARS = 2_000  # a 16k-token completion is ~60 kB: cut, so a table stays small
INTERVAL_S = float(os.environ.get("SCALERL_TRACKING_INTERVAL_S", "10"))  # between passes
BACKOFF_S, BACKOFF_MAX_S = 10.0, 300.0
STOP_JOIN_S = 60.0  # stop() waits this long for a pass in flight (a hung tracker) to end

log = logging.getLogger("scalerl.tracking")
_NAME_RE = re.compile(r"[^A-Za-z0-9_\-./ :]")


def _number(value) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and value == value and abs(value) != float("inf"):
        return float(value)
    return None


def metric_name(name: str) -> str:
    """A name every tracker takes (MLflow: letters, digits, _ - . space : /): pass@1 ->
    pass_at_1."""
    return _NAME_RE.sub("_", str(name).replace("@", "_at_"))


def stream_points(
    stream: str, rows: list[dict], t0: float | None = None
) -> list[tuple[str, str, int, dict, float | None]]:
    """(group, axis, order, {metric: value}, wall_time) for each row of `stream`, in order: the
    group and its order are what the mirror's progress counts (the last order logged per group).
    wall_time: the row's own "time" (trainer, eval and scaling rows carry one), else `t0` (the
    run's creation): a point logged again after a crash carries the same time, and MLflow keeps
    one of identical (key, value, step, time) points, so a kill between a tracker taking a pass
    and the marker recording it logs nothing twice there."""
    out = []
    for i, row in enumerate(rows):
        if stream == "trainer":
            group, axis, order = "", "trainer", row.get("step")
        elif stream == "eval":
            v = row.get("version")
            group, axis, order = "", "eval", v if v is not None else row.get("step")
        elif stream == "eval_sets":
            group = str(row.get("set"))
            axis, order = f"eval_sets/{metric_name(group)}", row.get("version")
        elif stream == "prompts":
            group, axis, order = "", f"prompts/{metric_name(row.get('split'))}", i
        else:  # scaling: one row per fit, in append order
            group, axis, order = "", stream, i
        if order is None:
            continue
        values = {
            f"{axis}/{metric_name(k)}": x
            for k, v in row.items()
            if k not in KEYS and (x := _number(v)) is not None
        }
        t = _number(row.get("time"))
        if values:
            out.append((group, axis, int(order), values, t if t is not None else t0))
    return out


class _SinkSlot:
    def __init__(self, sink) -> None:
        self.sink, self.opened = sink, False
        self.key = f"{sink.name} {sink.where}"  # the marker's progress is per destination
        self.failures, self.next_try, self.warned = 0, 0.0, False
        # a sink whose points are on disk only once it is closed (W&B: wandb-core buffers its
        # run file; a SIGKILL loses every point since the run was opened) has its progress
        # in the marker moved on at close only; `live` is what this process logged meanwhile
        self.durable = getattr(sink, "durable_on_log", True)
        self.live: dict | None = None


class TrackerMirror:
    def __init__(
        self,
        run,
        config: dict,
        *,
        tracking: dict | None = None,
        interval_s: float = INTERVAL_S,
        logger=None,
        sinks: list | None = None,
    ) -> None:
        self.run, self.config = run, config
        self.interval_s = interval_s
        self.log = logger or log
        tracking = tracking if tracking is not None else (config.get("tracking") or {})
        run_dir = run.url if run.is_local else None
        if sinks is None:
            sinks = make_sinks(tracking, run.run_id, run_dir)
        self.slots = [_SinkSlot(s) for s in sinks]
        self.state = run.read_marker(MARKER) or {}
        self.state.setdefault("sinks", {})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0: float | None = None  # the run's creation time: rows without their own
        self._parts: dict[str, dict] = {name: {} for name in STREAMS}  # read_metrics' cache

    @property
    def active(self) -> bool:
        return bool(self.slots)

    # -- the thread ---------------------------------------------------------------------------

    def start(self) -> None:
        if not self.slots:
            return
        self._thread = threading.Thread(target=self._loop, name="scalerl-tracking", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            self._pass_safely(final=False)
            if self._stop.wait(self.interval_s):
                return

    def _pass_safely(self, final: bool) -> None:
        try:
            self.sync(final=final)
        except Exception as e:  # noqa: BLE001 - reading the store failed: the next pass retries
            self.log.warning("tracking: this pass could not read the run (%s); retrying", e)

    def stop(self, status: str | None = None) -> dict[str, int]:
        """End the thread, make a last pass (with the run's final status), close the sinks.
        Returns {sink: points not logged}, also logged and kept in the marker."""
        if not self.slots:
            return {}
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_JOIN_S)
            if self._thread.is_alive():  # a tracker call hangs: leave it, never the run
                self.log.warning(
                    "tracking: a tracker did not answer within %.0f s; its last points are not "
                    "logged. Fix: `scalerl runs track %s` back-fills them.",
                    STOP_JOIN_S,
                    self.run.run_id,
                )
                return {}
        for slot in self.slots:
            slot.next_try = 0.0  # the last pass tries every sink once more
        try:
            behind = self.sync(final=True, status=status)
        except Exception as e:  # noqa: BLE001
            self.log.warning("tracking: the last pass could not read the run (%s)", e)
            behind = {}
        for slot in self.slots:
            self._close(slot)
        return behind

    # -- one pass -----------------------------------------------------------------------------

    def sync(self, *, final: bool = False, status: str | None = None) -> dict[str, int]:
        """One pass: every sink (not waiting out a backoff) gets what it has not logged yet.
        `final`: also the run's status (read from the store unless given) and the count of
        points each sink is still behind, logged and kept in the marker."""
        streams = {  # each pass fetches only the part files it has not read before
            name: self.run.read_metrics(name, parts_seen=self._parts[name]).to_pylist()
            for name in STREAMS
        }
        if self._t0 is None:
            self._t0 = self.run.created_at() or 0.0
        points = {name: stream_points(name, rows, self._t0) for name, rows in streams.items()}
        if final and status is None:
            status = (self.run.read_status() or {}).get("state")
        cache: dict = {}
        now = time.monotonic()
        for slot in self.slots:
            if now < slot.next_try:
                continue
            self._sync_sink(slot, points, streams, cache, status if final else None)
        if not final:
            return {}
        behind = {}
        for slot in self.slots:
            done = self._progress(slot).get("done", {})
            behind[slot.sink.name] = sum(
                1
                for stream, pts in points.items()
                for group, _, order, _, _ in pts
                if order > done.get(stream, {}).get(group, -1)
            )
        self.state["behind"] = behind
        self._save()
        for name, n in behind.items():
            if n:
                self.log.warning(
                    "tracking: %s is %d points behind the run. Fix: `scalerl runs track %s` "
                    "back-fills them once the tracker is reachable.",
                    name,
                    n,
                    self.run.run_id,
                )
        return behind

    def _sync_sink(self, slot: _SinkSlot, points, streams, cache, status) -> None:
        sink = slot.sink
        self.state["sinks"].setdefault(slot.key, {"sink": sink.name, "done": {}})
        st = copy.deepcopy(self._progress(slot))  # moved on only once the sink took it
        try:
            if not slot.opened:
                st = self._open(slot, st)
            done = st.setdefault("done", {})
            if not st.get("params"):
                sink.log_params(flat_params(self.config))
                st["params"] = True
            top = -1
            for stream, pts in points.items():
                marks = done.setdefault(stream, {})
                for group, axis, order, values, wall_time in pts:
                    if stream == "trainer":
                        top = max(top, order)
                    if order > marks.get(group, -1):
                        sink.log_metrics(axis, order, values, wall_time)
                        marks[group] = order
            top = max(top, 0)
            plots = st.setdefault("plots", {})
            for name in PLOT_NAMES:
                png = cache.get(("plot", name)) or self._plot(name)
                cache[("plot", name)] = png
                if png is None:
                    continue
                digest = hashlib.sha256(png).hexdigest()[:16]
                if plots.get(name) != digest:
                    sink.log_image(name, png, top)
                    plots[name] = digest
            tables = st.setdefault("tables", [])
            for key, version in self._eval_shards(cache):
                if key not in tables:
                    sink.log_table(key, self._sample(key, cache), version)
                    tables.append(key)
            if status and st.get("status") != status:
                sink.flush()
                sink.set_status(status)
                st["status"] = status
            sink.flush()
        except Exception as e:  # noqa: BLE001 - a tracker never fails the run
            self._failed(slot, e)
            return
        if slot.failures:
            self.log.info("tracking: %s works again; logging goes on", sink.name)
        slot.failures, slot.warned = 0, False
        if slot.durable:
            self.state["sinks"][slot.key] = st
            self._save()
        else:
            slot.live = st

    def _open(self, slot: _SinkSlot, st: dict) -> dict:
        sink = slot.sink
        done = st.get("done") or {}
        if sink.name == "tensorboard" and st.get("opened"):
            # the events an earlier process wrote past its recorded progress are purged, and
            # everything from the purge step on is logged again (TensorBoard keeps no run id)
            last = (done.get("trainer") or {}).get("", -1)
            purge = last + 1
            st["purge_step"] = purge
            for stream in ("eval", "eval_sets"):
                for group, order in list((done.get(stream) or {}).items()):
                    done.setdefault(stream, {})[group] = min(order, purge - 1)
            st["plots"] = {}
        st = sink.open(st)
        st["opened"] = True
        slot.opened = True
        # the tracker run id is in the run before any point is logged: a crash from here on
        # continues this tracker run
        self.state["sinks"][slot.key] = {
            **self.state["sinks"].get(slot.key, {}),
            **{k: v for k, v in st.items() if k in ("sink", "id", "experiment_id", "opened")},
        }
        self._save()
        return st

    def _failed(self, slot: _SinkSlot, e: Exception) -> None:
        slot.failures += 1
        delay = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (slot.failures - 1))
        slot.next_try = time.monotonic() + delay
        what = redact_text(" ".join(str(e).split()))[:300]
        if not slot.warned:
            self.log.warning(
                "tracking: %s failed (%s: %s); the run goes on and %s is retried with backoff. "
                "Fix: %s.",
                slot.sink.name,
                type(e).__name__,
                what,
                slot.sink.name,
                slot.sink.fix,
            )
            slot.warned = True
        self._close(slot)

    def _progress(self, slot: _SinkSlot) -> dict:
        """What `slot`'s sink has taken: this process's own record for a sink not yet durable
        (slot.live), else the marker's."""
        if slot.live is not None:
            return slot.live
        return self.state["sinks"].get(slot.key) or {"sink": slot.sink.name, "done": {}}

    def _close(self, slot: _SinkSlot) -> None:
        if slot.opened:
            try:
                slot.sink.close()
            except Exception as e:  # noqa: BLE001
                self.log.debug("tracking: closing %s: %s", slot.sink.name, e)
            else:
                if slot.live is not None:  # closed cleanly: what it took is on disk now
                    keep = self.state["sinks"].get(slot.key, {})
                    self.state["sinks"][slot.key] = {**keep, **slot.live}
                    self._save()
            slot.live = None
            slot.opened = False

    def _save(self) -> None:
        try:
            self.run.write_marker(MARKER, self.state)
        except Exception as e:  # noqa: BLE001 - e.g. the lease is gone: the run decides
            self.log.warning("tracking: could not record the progress (%s)", e)

    # -- what the store holds besides metrics -------------------------------------------------

    def _plot(self, name: str) -> bytes | None:
        # plots/{name}.png (Run.save_plot); storage has no reader for it yet
        loc = self.run._loc
        path = f"{loc.join(self.run.run_id)}/plots/{name}.png"
        try:
            return loc.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def _eval_shards(self, cache) -> list[tuple[str, int]]:
        if "eval" not in cache:
            found = []
            for info in self.run.list_shards("eval"):
                tail = info.key.rsplit("v", 1)[-1]
                if tail.isdigit():
                    found.append((info.key, int(tail)))
            cache["eval"] = found
        return cache["eval"]

    def _sample(self, key: str, cache) -> list[dict]:
        if ("sample", key) not in cache:
            table = self.run.read_shard("eval", key)
            cols = ["prompt_id", "sample_index", "prompt", "completion", "reward", "finish_reason"]
            rows = table.select([c for c in cols if c in table.column_names]).to_pylist()
            rows.sort(key=lambda r: (str(r.get("prompt_id")), r.get("sample_index") or 0))
            cache[("sample", key)] = [
                {
                    "prompt": _cut(r.get("prompt")),
                    "completion": _cut(r.get("completion")),
                    "reward": r.get("reward"),
                    "finish_reason": r.get("finish_reason"),
                }
                for r in rows[:SAMPLE_ROWS]
            ]
        return cache[("sample", key)]


def _cut(text) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= MAX_TEXT_CHARS else text[: MAX_TEXT_CHARS - 1] + "…"


def start_mirror(run, config: dict, logger=None) -> TrackerMirror | None:
    """The mirror of `run` for `config` (run.json's form), started; None when no tracker is
    configured. A tracking section that cannot work (e.g. no place for TensorBoard's files) is
    one warning with its fix: the run goes on without trackers."""
    if not any((config.get("tracking") or {}).values()):
        return None
    try:
        mirror = TrackerMirror(run, config, logger=logger)
    except Exception as e:  # noqa: BLE001 - a tracker never fails the run
        (logger or log).warning("tracking: no tracker is logged to: %s", " ".join(str(e).split()))
        return None
    mirror.start()
    return mirror
