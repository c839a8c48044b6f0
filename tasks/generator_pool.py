"""The run's generators as one pool: task runs on the flow's machine, or child flow runs of a
deployment on a work pool anywhere (placement.generators_deployment); a lost one is replaced.

    pool = GeneratorPool(config, run_id); pool.start()
    pool.check(run)      # from the run flow's loop: replace lost generators, end the run's
                         # generation when every one has ended (all prompts retired)
    pool.wait(timeout)   # at the end, after the run's status left "running"

Remote generators are started with Prefect's run_deployment (timeout 0: started, not waited
on), as subflows of the run's flow run (linked under it in the UI), named `{run_id}/{gen}` and
tagged `run:{run_id}` and `role:generator`; the deployment's flow (flows/generate.py) reads the
run's config from run.json, so it needs only the storage URL and the run id: nothing on the
remote machine is shared with this one but the store.

A generator whose task run or flow run ends failed or crashed (its process killed, its machine
lost) while the run is running is replaced by a new generator `{slot}-r{n}`: a new id, because
the lost one may still be running somewhere (a partition), and two writers under one id would
collide. Its shards committed so far stay; its batch in flight is lost and generated again by
others. The backpressure gate counts live registered generators (tasks/rollouts.py), so the
replacement is counted as soon as it registers and the lost one when its heartbeat expires.
After MAX_REPLACEMENTS replacements of one slot the run fails (something is wrong with every
generator, not with one machine).
"""

from __future__ import annotations

import time

from runtime.logs import task_logger
from scalerl.config import RunConfig
from tasks.flow_runs import TAGS, run_tag

MAX_REPLACEMENTS = 3
CHECK_EVERY_S = 5.0  # a remote generator's state is an API call


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


def cancel_flow_runs(ids) -> None:
    """Cancel flow runs that have not ended (best effort): their workers stop the processes."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        for i in ids:
            try:
                state = client.read_flow_run(i).state
                if state is None or not state.is_final():
                    client.set_flow_run_state(i, Cancelling(), force=True)
            except Exception as exc:  # noqa: BLE001 - best effort
                task_logger().warning("could not cancel flow run %s (%s)", i, exc)


class LocalGenerator:
    """A generate_rollouts task run of this flow (its process on this machine)."""

    def __init__(self, generator_id: str, future) -> None:
        self.id, self.future = generator_id, future

    def cancel(self) -> None:
        pass  # a local child stops with the run's status (or stop_children)

    def state(self) -> str:
        if not self.future.wrapped_future.done():  # (.state would be an API call)
            return "running"
        return "completed" if self.future.state.is_completed() else "failed"

    def wait(self, deadline: float | None = None) -> None:
        self.future.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))


class RemoteGenerator:
    """A child flow run of the generators' deployment, on whatever machine its pool has."""

    def __init__(self, generator_id: str, flow_run_id) -> None:
        self.id, self.flow_run_id = generator_id, flow_run_id
        self.last = "running"

    def state(self) -> str:
        from prefect.client.orchestration import get_client

        try:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(self.flow_run_id).state
        except Exception as exc:  # noqa: BLE001 - the API blinked: ask again next time
            task_logger().warning("could not read generator %s's flow run (%s)", self.id, exc)
            return self.last
        if state is None or not state.is_final():
            self.last = "running"
        else:
            self.last = "completed" if state.is_completed() else "failed"
        return self.last

    def cancel(self) -> None:
        cancel_flow_runs([self.flow_run_id])

    def wait(self, deadline: float | None = None) -> None:
        """Until its flow run ends, or until time.monotonic() passes `deadline` (then it is
        cancelled: its machine may be gone, and a scheduled one would start late)."""
        while self.state() == "running":
            if deadline is not None and time.monotonic() > deadline:
                task_logger().warning(
                    "generator %s (flow run %s) has not ended: cancelling it",
                    self.id,
                    self.flow_run_id,
                )
                self.cancel()
                return
            time.sleep(1.0)


class GeneratorPool:
    def __init__(self, config: RunConfig, run_id: str) -> None:
        self.config, self.run_id = config, run_id
        self.slots: dict[str, list] = {}
        self._checked = float("-inf")

    @property
    def remote(self) -> bool:
        return self.config.placement.generators_deployment is not None

    def start(self) -> None:
        for i in range(self.config.generation.num_generators):
            slot = f"gen{i}"
            self.slots[slot] = [self._launch(slot, slot)]

    def _launch(self, generator_id: str, slot: str):
        if not self.remote:
            from tasks.rollouts import generate_rollouts

            return LocalGenerator(  # a replacement takes its slot's devices (placement)
                generator_id,
                generate_rollouts.submit(self.config, self.run_id, generator_id, placed_as=slot),
            )
        flow_run = start_role(
            self.config,
            self.run_id,
            self.config.placement.generators_deployment,
            generator_id,
            "generator",
            generator_id=generator_id,
        )
        task_logger().info(
            "generator %s: flow run %s of deployment %s",
            generator_id,
            flow_run.id,
            self.config.placement.generators_deployment,
        )
        return RemoteGenerator(generator_id, flow_run.id)

    @property
    def current(self) -> list:
        return [gens[-1] for gens in self.slots.values()]

    def check(self, run) -> None:
        """Replace the lost generators while the run is running; when every generator has
        ended by itself (all prompts retired), tell the trainer no more data is coming. Lost:
        its task or flow run ended failed or crashed, or (remote) it registered and its
        heartbeat then expired (a lost machine's flow run may stay Running for good)."""
        if self.remote and time.monotonic() - self._checked < CHECK_EVERY_S:
            return
        self._checked = time.monotonic()
        if (run.read_status() or {}).get("state") != "running":
            return
        expired = self._expired(run) if self.remote else set()
        states = {}
        for slot, gens in self.slots.items():
            state = gens[-1].state()
            if state == "running" and gens[-1].id in expired:
                gens[-1].cancel()
                state = "failed"
            if state == "failed":
                if len(gens) > MAX_REPLACEMENTS:
                    run.write_status(
                        {
                            "state": "failed",
                            "reason": f"generator slot {slot} was lost {len(gens)} times "
                            f"(last: {gens[-1].id}); see its runs",
                        }
                    )
                    return
                replacement = f"{slot}-r{len(gens)}"
                task_logger().warning(
                    "generator %s was lost (%s): the run goes on with the others, and %s "
                    "replaces it",
                    gens[-1].id,
                    "its heartbeat stopped"
                    if gens[-1].id in expired
                    else f"its {'flow run' if self.remote else 'task run'} ended failed or crashed",
                    replacement,
                )
                try:
                    gens.append(self._launch(replacement, slot))
                except Exception as exc:  # noqa: BLE001 - the API blinked: next check retries
                    task_logger().warning(
                        "could not start %s yet (%s); trying again", replacement, exc
                    )
                state = "running"
            states[slot] = state
        if states and all(s == "completed" for s in states.values()):
            run.write_status(
                {"state": "exhausted", "reason": "every generator ended (prompts retired)"}
            )

    def _expired(self, run) -> set[str]:
        """Generators that registered and whose heartbeat is older than GENERATOR_TTL_S."""
        from runtime.registry import GENERATOR_PREFIX, live_generators

        live = live_generators(run)
        return {
            name[len(GENERATOR_PREFIX) :]
            for name in run.read_markers(GENERATOR_PREFIX)
            if name[len(GENERATOR_PREFIX) :] not in live
        }

    def cancel(self) -> None:
        """Stop the remote generators now (the run flow failed; local ones stop with it)."""
        for gen in self.current:
            gen.cancel()

    def wait(self, timeout: float | None = None) -> None:
        """Until every generator has ended; remote ones share one deadline `timeout` from now,
        after which the rest are cancelled."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for gen in self.current:
            gen.wait(deadline)
