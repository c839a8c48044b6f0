"""The trainer's side of every transport: the shared publish and the publish ledger.

    publisher = transport_for(config).publisher(run, "bfloat16")  # a TransportPublisher
    publisher.publish(v, model, tokenizer)    # on the trainer's background publisher thread
    publisher.make_durable(v)                 # at a checkpoint: the store receives v now

One publish: the state dict cast once to the generators' dtype, save_pretrained into a staging
directory (under model.lora the adapter alone, in adapter/: scalerl/lora.py), the ledger row,
the commit (the transport's: nothing for the store, a rename into the node-local directory for
local), the store's copy when the transport says the version is
durable (manifest-last, sha256 of each file), then retention (runtime/retention.py Pruner).
Everything runs on the trainer's background publisher thread, off its step.

The ledger: before a version becomes visible to anyone, the trainer appends its row to the
run's `weights` metrics stream (version, transport, durable, bytes, host, time). A version a
generator used but the store never received is therefore always identifiable, and verify
tells "never stored by design" (durable false) from "lost". A crash between the row and the
publish leaves a row for a version nobody saw; the resumed trainer publishes it again.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from collections import deque
from pathlib import Path

from scalerl.faults import kill_point
from storage import Run

LEDGER = "weights"  # metrics stream: one row per published version


def record_version(run: Run, version: int, transport: str, durable: bool, size: int) -> None:
    """The publish ledger's row for `version` (module docstring)."""
    run.append_metrics(
        LEDGER,
        [
            {
                "version": version,
                "transport": transport,
                "durable": durable,
                "bytes": size,
                "host": socket.gethostname(),
                "published_at": time.time(),
            }
        ],
    )


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class TransportPublisher:
    """The trainer's WeightPublisher (scalerl.trainer.loop) over one transport (module
    docstring). As it stands it publishes transport store's way: every version is staged in a
    temporary directory and goes to the store; the other transports override _staging,
    _commit, make_durable and latest_version."""

    def __init__(self, run: Run, transport, dtype: str | None = None) -> None:
        self.run, self.transport, self.config = run, transport, transport.config
        self.dtype_name = dtype or self.config.model.dtype
        self.pruner = None
        if self.config.weights.prune:
            from runtime.retention import Pruner

            self.pruner = Pruner(run, self.config, None)
        self.timings: deque[dict] = deque(maxlen=100)  # last publishes: save / store seconds

    @property
    def dtype(self):
        """The generators' dtype, as a torch dtype (torch is imported here, not by the flow
        process, which imports this module)."""
        from scalerl.models import torch_dtype

        return torch_dtype(self.dtype_name)

    def publish(
        self,
        version: int,
        model,
        tokenizer,
        state_dict: dict | None = None,
        *,
        durable: bool | None = None,
    ) -> None:
        """durable: whether the store receives it (default: the transport's policy)."""
        state = state_dict if state_dict is not None else model.state_dict()
        from scalerl.models import map_tensors

        dtype = self.dtype  # cast once per tensor: a tied head stays the embedding's tensor
        state = map_tensors(state, lambda t: t.to(dtype) if t.is_floating_point() else t)
        if durable is None:
            durable = self.transport.durable(version)
        t0 = time.perf_counter()
        staged = self._staging(version, state)
        try:
            self._save(version, staged, model, tokenizer, state)
            saved = time.perf_counter()
            kill_point("publisher.before_commit")  # trained and saved, visible to no one
            self._ledger(version, durable, dir_bytes(staged))  # before anyone can see it
            path = self._commit(version, staged)
            if durable:
                self.run.publish_weights(version, path, overwrite=True)
        finally:
            if staged.exists():  # the temporary directory, or a local commit that failed
                shutil.rmtree(staged, ignore_errors=True)
        done = time.perf_counter()
        self.timings.append({"version": version, "save_s": saved - t0, "store_s": done - saved})
        if self.pruner is not None:
            self.pruner.after_publish(version)

    def _staging(self, version: int, state: dict) -> Path:
        """A fresh directory to save `version` into (removed after the publish if still there)."""
        return Path(tempfile.mkdtemp(prefix="scalerl-weights-"))

    def _save(self, version: int, staged: Path, model, tokenizer, state: dict) -> None:
        adapters = getattr(model, "peft_config", None)  # peft injected them (model.lora)
        if not adapters:
            model.save_pretrained(staged, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(staged)
            return
        # model.lora: `state` is the adapter; the version holds it alone (scalerl/lora.py), and
        # version 0 (published by a trainer that found none) the base model beside it
        from scalerl.lora import ADAPTER_DIR, TRAINED, base_params, save_adapter

        if version == 0:
            dtype = self.dtype
            base = {
                n: p.detach().to(dtype) if p.is_floating_point() else p.detach()
                for n, p in base_params(model).items()
            }
            model.save_pretrained(staged, state_dict=base, safe_serialization=True)
            tokenizer.save_pretrained(staged)
        save_adapter(staged / ADAPTER_DIR, state, adapters["default"], getattr(model, TRAINED, ()))

    def _commit(self, version: int, staged: Path) -> Path:
        """Make the saved version visible the transport's way; the directory it is in now."""
        return staged

    def make_durable(self, version: int) -> None:
        """The store receives `version` now if it has not yet (a checkpoint's version): with
        transport store it has already."""

    def latest_version(self) -> int | None:
        return self.run.latest_weights_version()

    def _ledger(self, version: int, durable: bool, size: int) -> None:
        record_version(self.run, version, self.transport.name, durable, size)
