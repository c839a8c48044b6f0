"""The run's generators as one pool: task runs on the flow's machine, or child flow runs of a
deployment on a work pool anywhere (placement.generators_deployment); a lost one is replaced.

    pool = make_generators(config, run)   # local or remote, chosen once; a Role (tasks/roles.py)
    pool.start()
    pool.check()         # from the run flow's loop: replace lost generators, end the run's
                         # generation when every one has ended (all prompts retired)
    pool.wait_for_end()  # at the end, after the run's status left "running" (remote ones:
                         # at most REMOTE_WAIT_S, then the rest are cancelled)

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
from abc import abstractmethod

from runtime.logs import task_logger
from scalerl.config import RunConfig
from tasks.flow_runs import cancel_flow_runs, flow_run_states, start_role
from tasks.roles import Role, TaskRunRole

MAX_REPLACEMENTS = 3
CHECK_EVERY_S = 5.0  # a remote generator's state is an API call
REMOTE_WAIT_S = 300.0  # remote generators end within seconds of the status change; a lost
# machine's flow run may never end: the run does not wait on it longer than this


class LocalGenerator(TaskRunRole):
    """A generate_rollouts task run of this flow (its process on this machine)."""

    def __init__(self, generator_id: str, submit) -> None:
        super().__init__(f"generator {generator_id}", submit)
        self.id = generator_id

    def state(self) -> str:
        return self.task_run.state()


class RemoteGenerator(Role):
    """A child flow run of the generators' deployment, on whatever machine its pool has
    (started by the pool; wait() cancels it at its deadline)."""

    where = "flow run"

    def __init__(self, generator_id: str, flow_run_id) -> None:
        self.id, self.flow_run_id = generator_id, flow_run_id
        self.last = "running"

    def __repr__(self) -> str:
        return f"generator {self.id} (flow run {self.flow_run_id})"

    def start(self) -> None:
        pass  # started by GeneratorPool through start_role

    def state(self) -> str:
        try:
            (state,) = flow_run_states([self.flow_run_id])
        except Exception as exc:  # noqa: BLE001 - the API blinked: ask again next time
            task_logger().warning("could not read generator %s's flow run (%s)", self.id, exc)
            return self.last
        if state is None or not state.is_final():
            self.last = "running"
        else:
            self.last = "completed" if state.is_completed() else "failed"
        return self.last

    def done(self) -> bool:
        return self.state() != "running"

    def result(self) -> str:
        return self.last

    def cancel(self) -> None:
        cancel_flow_runs([self.flow_run_id])


class GeneratorPool(Role):
    """The run's generators, one slot each (gen0, gen1, ...); each slot's last member is its
    current generator. Subclasses say how a generator is launched and where it runs."""

    check_every_s = 0.0  # how often check() looks at the generators' states

    def __init__(self, config: RunConfig, run) -> None:
        self.config, self.run = config, run
        self.slots: dict[str, list] = {}
        self._checked = float("-inf")

    def __repr__(self) -> str:
        return f"the generators ({self.where}s)"

    def start(self) -> None:
        for i in range(self.config.generation.num_generators):
            slot = f"gen{i}"
            self.slots[slot] = [self._launch(slot, slot)]

    @abstractmethod
    def _launch(self, generator_id: str, slot: str) -> Role:
        """Start generator `generator_id` in `slot` (whose planned devices it takes)."""

    def _expired(self) -> set[str]:
        """Generators lost although their run has not ended (only remote ones can be)."""
        return set()

    @property
    def current(self) -> list:
        return [gens[-1] for gens in self.slots.values()]

    def check(self) -> None:
        """Replace the lost generators while the run is running; when every generator has
        ended by itself (all prompts retired), tell the trainer no more data is coming. Lost:
        its task or flow run ended failed or crashed, or (remote) it registered and its
        heartbeat then expired (a lost machine's flow run may stay Running for good)."""
        if time.monotonic() - self._checked < self.check_every_s:
            return
        self._checked = time.monotonic()
        run = self.run
        if (run.read_status() or {}).get("state") != "running":
            return
        expired = self._expired()
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
                    else f"its {self.where} ended failed or crashed",
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

    def done(self) -> bool:
        return all(gen.done() for gen in self.current)

    def result(self) -> dict:
        """Each current generator's state: {generator id: "completed" | "failed" | "running"}."""
        return {gen.id: gen.state() for gen in self.current}

    def waitables(self) -> list:
        return [f for gen in self.current for f in gen.waitables()]

    def cancel(self) -> None:
        """Stop the remote generators now (the run flow failed; local ones stop with it)."""
        for gen in self.current:
            gen.cancel()

    def wait(self, deadline: float | None = None) -> None:
        """Until every generator has ended; remote ones share one `deadline`
        (time.monotonic()), after which the rest are cancelled."""
        for gen in self.current:
            gen.wait(deadline)


class LocalGenerators(GeneratorPool):
    """generate_rollouts task runs of the run flow, each supervising its process here."""

    def _launch(self, generator_id: str, slot: str) -> LocalGenerator:
        from tasks.rollouts import generate_rollouts

        generator = LocalGenerator(  # a replacement takes its slot's devices (placement)
            generator_id,
            lambda: generate_rollouts.submit(
                self.config, self.run.run_id, generator_id, placed_as=slot
            ),
        )
        generator.start()
        return generator


class RemoteGenerators(GeneratorPool):
    """Child flow runs of placement.generators_deployment, on its work pool's machines."""

    where = "flow run"
    end_wait_s = REMOTE_WAIT_S
    check_every_s = CHECK_EVERY_S

    def _launch(self, generator_id: str, slot: str) -> RemoteGenerator:
        deployment = self.config.placement.generators_deployment
        flow_run = start_role(
            self.config,
            self.run.run_id,
            deployment,
            generator_id,
            "generator",
            generator_id=generator_id,
        )
        task_logger().info(
            "generator %s: flow run %s of deployment %s", generator_id, flow_run.id, deployment
        )
        return RemoteGenerator(generator_id, flow_run.id)

    def _expired(self) -> set[str]:
        """Generators that registered and whose heartbeat is older than GENERATOR_TTL_S."""
        from runtime.registry import GENERATOR_PREFIX, live_generators

        live = live_generators(self.run)
        return {
            name[len(GENERATOR_PREFIX) :]
            for name in self.run.read_markers(GENERATOR_PREFIX)
            if name[len(GENERATOR_PREFIX) :] not in live
        }


def make_generators(config: RunConfig, run) -> GeneratorPool:
    """The run's generators: here, or on placement.generators_deployment's work pool."""
    if config.placement.generators_deployment is None:
        return LocalGenerators(config, run)
    return RemoteGenerators(config, run)
