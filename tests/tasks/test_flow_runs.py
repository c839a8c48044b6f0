"""The flow runs of a ScaleRL run in the Prefect API: named and tagged after the run, found again
by a retry, and what a killed attempt left Running set to Crashed (never a live parent)."""

import uuid

from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.states import Running

from tasks.flow_runs import claimed_run_id, crash_leftovers, label_flow_run, run_id_of_tags


def _leftover(client, flow_run_id, name):
    """A task run in state Running, as a SIGKILLed attempt leaves it."""
    return client.create_task_run(
        task=task(lambda: None, name=name),
        flow_run_id=flow_run_id,
        dynamic_key=uuid.uuid4().hex,
        state=Running(),
    )


def test_run_id_of_tags():
    assert run_id_of_tags(["scalerl", "run:20261125-153012-a1b2"]) == "20261125-153012-a1b2"
    assert run_id_of_tags(["scalerl"]) is None
    assert run_id_of_tags(None) is None


def test_a_retry_finds_its_run_and_closes_what_the_killed_attempt_left(prefect_harness):
    seen = {}

    @flow(name="scalerl-probe")
    def attempt(run_id=None):
        ctx = FlowRunContext.get()
        with get_client(sync_client=True) as client:
            if not seen:  # the first attempt: a new id, then "killed" with a task Running
                seen["run_id"] = claimed_run_id(run_id)
                label_flow_run(seen["run_id"])
                seen["leftover"] = _leftover(client, ctx.flow_run.id, "trainer").id
                return None
            # a retry of the same flow run with the same (empty) parameters
            again = claimed_run_id(run_id)
            closed = crash_leftovers(again)
            state = client.read_task_run(seen["leftover"]).state
            return again, closed, state, client.read_flow_run(ctx.flow_run.id)

    first = attempt(return_state=True)
    flow_run_id = first.state_details.flow_run_id
    from prefect.flow_engine import run_flow

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
    again, closed, state, renamed = run_flow(attempt, flow_run=flow_run, parameters={})
    assert again == seen["run_id"]  # not a new id
    assert closed == 1 and state.type.value == "CRASHED"
    assert "earlier attempt" in state.message
    assert renamed.name == f"scalerl-probe/{again}"
    assert {"scalerl", f"run:{again}"} <= set(renamed.tags)


def test_a_resume_closes_another_flow_run_of_the_run_but_not_its_own_parent(prefect_harness):
    run_id = f"r-{uuid.uuid4().hex[:6]}"
    ids = {}

    @flow(name="scalerl-killed")
    def killed():
        label_flow_run(run_id)
        ctx = FlowRunContext.get()
        with get_client(sync_client=True) as client:
            ids["killed_task"] = _leftover(client, ctx.flow_run.id, "generator").id
            ids["killed_flow"] = ctx.flow_run.id

    @flow(name="scalerl-child")
    def child():
        label_flow_run(run_id)
        return crash_leftovers(run_id)

    @flow(name="scalerl-parent")
    def parent():
        label_flow_run(run_id)  # the parent carries the run's tag too, and is alive
        ids["parent"] = FlowRunContext.get().flow_run.id
        return child()

    killed()
    with get_client(sync_client=True) as client:  # as a SIGKILL leaves it: still Running
        client.set_flow_run_state(ids["killed_flow"], Running(), force=True)
    assert parent() == 2  # the killed flow run and its task run
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(ids["killed_flow"]).state.type.value == "CRASHED"
        assert client.read_task_run(ids["killed_task"]).state.type.value == "CRASHED"
        assert client.read_flow_run(ids["parent"]).state.type.value == "COMPLETED"
