"""One trainer rank under torchrun (runtime/torchrun.py starts it): python -m runtime.trainer_rank SPEC.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; the Trainer joins the process group from them
(scalerl/trainer/distributed.py) and every rank runs runtime.trainer:trainer_body. Rank 0 writes
the summary to SPEC.result.json; a failing rank writes SPEC.error-RANK.json and exits 1 (torchrun
then stops the others). Log lines go to stderr with a rank prefix, which the task relays.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path


def main(spec_path: str) -> int:
    rank = int(os.environ.get("RANK", "0"))
    spec = json.loads(Path(spec_path).read_text())
    from runtime.isolated import PARENT_ENV, watch_parents

    # the flow process and this rank's torchrun agent (a SIGKILLed agent cannot stop its workers)
    flow = int(os.environ.get(PARENT_ENV, "0"))
    watch_parents(*[p for p in (flow, os.getppid()) if p])
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank {rank}] %(message)s",
        stream=sys.stderr,
        force=True,
    )
    import torch

    if spec.get("torch_threads"):
        torch.set_num_threads(int(spec["torch_threads"]))
    from runtime.trainer import trainer_body
    from scalerl.config import RunConfig

    try:
        config = RunConfig.model_validate(spec["config"])
        summary = trainer_body(config, spec["run_id"])
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the task
        logging.getLogger("scalerl.task").exception("trainer rank %d failed", rank)
        kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
        Path(f"{spec_path}.error-{rank}.json").write_text(
            json.dumps({"type": kind, "message": str(exc)})
        )
        return 1
    peaks = _peak_rss_per_rank()
    print(f"[rank {rank}] peak RSS {peaks[rank]:.0f} MiB", file=sys.stderr, flush=True)
    if rank == 0:
        summary["peak_rss_mib_per_rank"] = peaks
        tmp = Path(f"{spec_path}.result.json.tmp")
        tmp.write_text(json.dumps(summary, default=str))
        tmp.replace(f"{spec_path}.result.json")
        if spec.get("attempt"):  # over several nodes: the run flow reads it from the store
            from runtime.trainer_node import report_summary

            report_summary(config, spec["run_id"], spec["attempt"], summary)
    _shutdown()
    return 0


def _peak_rss_per_rank() -> list[float]:
    import torch.distributed as dist

    from runtime.common import peak_rss_mib

    mine = peak_rss_mib()
    if not dist.is_initialized():
        return [mine]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
