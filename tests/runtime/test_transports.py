"""The transports' one interface (runtime/transports/): the factory picks each variant from the
config, and each answers for itself (durability, engine arguments, what it needs of the
machine, where a reader finds a version in place, its cleanup at the end of a run)."""

from __future__ import annotations

import pytest

from runtime.common import WeightCache, check_placement
from runtime.transports import end_of_run, published_version, transport_for
from runtime.transports.base import WeightTransport
from runtime.transports.local import LOCAL_MARKER, LocalTransport
from runtime.transports.nccl import NcclTransport
from runtime.transports.store import StoreTransport
from scalerl.config import load_config
from storage import open_store


def _cfg(tmp_path, *overrides: str):
    return load_config(
        preset="tiny-cpu",
        overrides=[f"storage.url={tmp_path / 'store'}", "evaluation.every_steps=4", *overrides],
    )


def _nccl(tmp_path):
    return _cfg(
        tmp_path,
        "placement.accelerator=cuda",
        "generation.engine=vllm",
        "weights.transport=nccl",
        "weights.durable_every=3",
    )


def test_the_factory_picks_each_transport_from_the_config(tmp_path):
    local = _cfg(tmp_path, "weights.transport=local", "weights.durable_every=3")
    for cfg, kind in (
        (_cfg(tmp_path), StoreTransport),
        (local, LocalTransport),
        (_nccl(tmp_path), NcclTransport),
    ):
        transport = transport_for(cfg)
        assert type(transport) is kind and isinstance(transport, WeightTransport)
        assert transport.name == cfg.weights.transport and transport.config is cfg


def test_each_transport_has_its_durability_and_engine_arguments(tmp_path):
    store, local, nccl = (
        transport_for(_cfg(tmp_path)),
        transport_for(_cfg(tmp_path, "weights.transport=local", "weights.durable_every=3")),
        transport_for(_nccl(tmp_path)),
    )
    assert all(store.durable(v) for v in range(7))
    # beside the store: v0, multiples of durable_every (3, 6) and of evaluation.every_steps (4)
    for transport in (local, nccl):
        assert [v for v in range(9) if transport.durable(v)] == [0, 3, 4, 6, 8]
    assert store.engine_args() == local.engine_args() == {}
    assert nccl.engine_args() == {"weight_transfer_config": {"backend": "nccl"}}


def test_nccl_is_refused_on_a_machine_without_cuda(tmp_path):
    cfg = _nccl(tmp_path)
    with pytest.raises(ValueError, match=r"^weights.transport = 'nccl' sends weights GPU to GPU"):
        transport_for(cfg).check("cpu")
    transport_for(cfg).check("cuda")  # nothing to refuse there
    for other in (_cfg(tmp_path), _cfg(tmp_path, "weights.transport=local")):
        transport_for(other).check("cpu")
    # check_placement asks the transport first (a config the validator would refuse: as if
    # placement.accelerator=auto had found no CUDA device)
    on_cpu = cfg.model_copy(
        update={"placement": cfg.placement.model_copy(update={"accelerator": "cpu"})}
    )
    with pytest.raises(ValueError, match="= 'cpu' found no CUDA device here. Fix: "):
        check_placement(on_cpu)


def test_a_reader_finds_local_versions_in_place_and_the_end_of_the_run_drops_them(tmp_path):
    import socket

    cfg = _cfg(tmp_path, "weights.transport=local", f"weights.local_dir={tmp_path / 'shm'}")
    run = open_store(cfg.storage.url).run("t", create=True)
    root = tmp_path / "shm" / "t"
    (root / "v2").mkdir(parents=True)
    (root / "v2" / "config.json").write_text("{}")
    (root / "LATEST").write_text('{"version": 2}')
    run.write_marker(LOCAL_MARKER, {"root": str(root), "host": socket.gethostname()})
    transport = transport_for(cfg)
    assert transport.local_path(run, 2) == root / "v2"
    assert transport.local_path(run, 1) is None  # not there: downloaded from the store
    assert WeightCache(run, tmp_path / "cache", cfg).path(2) == root / "v2"
    assert published_version(run, cfg) == 2  # the pointer's, the store has none yet
    # the store's transport never looks there
    store_cfg = _cfg(tmp_path)
    assert transport_for(store_cfg).local_path(run, 2) is None
    assert published_version(run, store_cfg) is None
    end_of_run(store_cfg, run)
    assert root.is_dir()
    end_of_run(cfg, run)
    assert not root.exists()
