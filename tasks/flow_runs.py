"""The flow runs of a ScaleRL run, as the Prefect UI shows them: named and tagged after the run
id, found again on a Retry, and no phantom work left "Running" by an attempt that crashed.

    run_id = claimed_run_id(config.storage.run_id)   # the id given, this flow run's, or a new one
    label_flow_run(run_id)                           # name "scalerl-run/RUN_ID", tag "run:RUN_ID"
    crash_leftovers(run_id)                          # earlier attempts' Running task runs -> Crashed
    start_role(config, run_id, deployment, name, role, **parameters)   # a role's flow run elsewhere
    flow_run_states(ids); cancel_flow_runs(ids)      # follow and stop the roles' flow runs

A Retry in the UI runs the same flow run again with the same parameters (often run_id None):
the tag written by the first attempt says which ScaleRL run it started, so the retry resumes that
run instead of starting a new one. Every call here talks to the Prefect API and is best effort:
a run never fails because the UI could not be labelled; it logs a warning instead.
"""

from __future__ import annotations

import logging

RUN_TAG_PREFIX = "run:"
TAGS = ["scalerl"]


def _log():
    """The flow run's logger (its lines show in the UI), or this module's outside a flow."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def run_tag(run_id: str) -> str:
    return f"{RUN_TAG_PREFIX}{run_id}"


def run_id_of_tags(tags) -> str | None:
    """The ScaleRL run id a flow run was tagged with, or None."""
    found = [t[len(RUN_TAG_PREFIX) :] for t in tags or () if t.startswith(RUN_TAG_PREFIX)]
    return found[0] if found else None


def _current():
    """(flow run id, flow name) of the flow run this code runs in, or (None, None)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return None, None
    return ctx.flow_run.id, ctx.flow.name if ctx.flow else None


def current_flow_run_id() -> str | None:
    flow_run_id, _ = _current()
    return None if flow_run_id is None else str(flow_run_id)


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def claimed_run_id(given: str | None) -> str:
    """The run id this flow run works on: `given` when set; else the one an earlier attempt of
    this same flow run tagged it with (a Retry from the UI); else a new timestamped id."""
    from runtime.common import new_run_id

    if given:
        return given
    flow_run_id, _ = _current()
    if flow_run_id is not None:
        try:
            with _client() as client:
                earlier = run_id_of_tags(client.read_flow_run(flow_run_id).tags)
            if earlier:
                _log().info("flow run %s is a retry of run %s: resuming it", flow_run_id, earlier)
                return earlier
        except Exception as exc:  # noqa: BLE001 - the UI's bookkeeping never fails a run
            _log().warning("could not read this flow run's tags (%s); starting a new run id", exc)
    return new_run_id()


def label_flow_run(run_id: str) -> None:
    """Name this flow run "<flow>/<run id>" and tag it, so the UI lists runs by their ids and a
    retry finds its run. Done before anything is written, so a crash after it is recoverable."""
    flow_run_id, flow_name = _current()
    if flow_run_id is None:
        return
    try:
        with _client() as client:
            tags = client.read_flow_run(flow_run_id).tags or []
            wanted = sorted({*tags, *TAGS, run_tag(run_id)})
            client.update_flow_run(flow_run_id, name=f"{flow_name}/{run_id}", tags=wanted)
    except Exception as exc:  # noqa: BLE001
        _log().warning("could not name flow run %s after run %s: %s", flow_run_id, run_id, exc)


def crash_leftovers(run_id: str) -> int:
    """Set to Crashed what earlier attempts of this run left unfinished in the UI: task runs still
    Running or Pending under this flow run (a Retry) or under another flow run of the same run
    (a resume), and those other flow runs themselves when still Running. Returns how many states
    were set. A SIGKILLed process cannot report its own end, so without this the UI shows work
    that no process does."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterTags,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    flow_run_id, _ = _current()
    if flow_run_id is None:
        return 0
    unfinished = [StateType.RUNNING, StateType.PENDING]
    message = f"left unfinished by an earlier attempt of run {run_id}; resumed by {flow_run_id}"
    done = 0
    try:
        with _client() as client:
            others = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[run_tag(run_id)]))
            )
            others = [f for f in others if f.id != flow_run_id and not _is_ancestor(client, f.id)]
            for other in others:
                if other.state is not None and other.state.type in unfinished:
                    client.set_flow_run_state(other.id, Crashed(message=message), force=True)
                    done += 1
            ids = [flow_run_id, *(f.id for f in others)]
            stale = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)),
                task_run_filter=TaskRunFilter(
                    state=TaskRunFilterState(
                        type=TaskRunFilterStateType(any_=unfinished), name=None
                    )
                ),
            )
            for task_run in stale:
                client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
                done += 1
    except Exception as exc:  # noqa: BLE001
        _log().warning("could not close the task runs left by earlier attempts: %s", exc)
    if done:
        _log().info("run %s: %d task/flow run(s) of earlier attempts set to Crashed", run_id, done)
    return done


def _is_ancestor(client, candidate_id) -> bool:
    """True when `candidate_id` is a parent flow run of the current one (e.g. the resume
    deployment's flow run that runs this one as a subflow): it is alive, not a leftover."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    parent_task = ctx.flow_run.parent_task_run_id if ctx and ctx.flow_run else None
    while parent_task is not None:
        parent_flow = client.read_task_run(parent_task).flow_run_id
        if parent_flow == candidate_id:
            return True
        parent_task = client.read_flow_run(parent_flow).parent_task_run_id
    return False


def record_flow_run(run) -> None:
    """markers/flow_run.json: the flow run now working on `run` (id, flow, attempt, when), so a
    reader of the store finds the run's page in the UI."""
    import time

    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    run.write_marker(
        "flow_run",
        {
            "flow_run_id": str(ctx.flow_run.id),
            "flow_run_name": ctx.flow_run.name,
            "flow": ctx.flow.name if ctx.flow else None,
            "attempt": ctx.flow_run.run_count,
            "at": time.time(),
        },
    )


def _writer_lease() -> str | None:
    """The run flow's lease ($SCALERL_LEASE), handed to the roles it starts elsewhere."""
    import os

    from storage import lease as leases

    return os.environ.get(leases.ENV)


def start_role(config, run_id: str, deployment: str, name: str, role: str, **parameters):
    """Start one of the run's roles elsewhere: a flow run of `deployment` named RUN/name,
    linked under the run's flow run and tagged run:RUN role:ROLE, with the parameters every
    role flow takes (the store, the run, the run flow's writer lease for fencing) and its own.
    Not waited on (timeout 0): the caller follows its state. Returns the flow run."""
    from prefect.deployments import run_deployment

    storage = config.storage
    return run_deployment(
        deployment,
        parameters={
            "storage_url": storage.url,
            "run_id": run_id,
            **parameters,
            "endpoint_url": storage.endpoint_url,
            "writer_lease": _writer_lease(),
        },
        timeout=0,
        as_subflow=True,  # linked under the run's flow run in the UI
        flow_run_name=f"{run_id}/{name}",
        tags=[*TAGS, run_tag(run_id), f"role:{role}"],
    )


def flow_run_states(ids) -> list:
    """The current state of each flow run in `ids` (None before its first); raises when the
    API cannot be read (the caller asks again at its next look)."""
    with _client() as client:
        return [client.read_flow_run(i).state for i in ids]


def cancel_flow_runs(ids) -> None:
    """Cancel flow runs that have not ended (best effort): their workers stop the processes."""
    from prefect.states import Cancelling

    from runtime.logs import task_logger

    with _client() as client:
        for i in ids:
            try:
                state = client.read_flow_run(i).state
                if state is None or not state.is_final():
                    client.set_flow_run_state(i, Cancelling(), force=True)
            except Exception as exc:  # noqa: BLE001 - best effort
                task_logger().warning("could not cancel flow run %s (%s)", i, exc)
