"""StoreWeights hands the generator the newest published version and keeps one local copy."""

from runtime.common import WeightCache
from runtime.generation import StoreWeights
from storage import open_store


def test_poll_returns_the_newest_version_and_deletes_older_local_copies(tmp_path):
    run = open_store(str(tmp_path / "runs")).run("w", create=True)
    for v in range(3):
        d = tmp_path / f"src{v}"
        d.mkdir()
        (d / "config.json").write_text(f'{{"v": {v}}}')
        run.publish_weights(v, d)
    cache = WeightCache(run, tmp_path / "local")
    cache.path(0)
    source = StoreWeights(cache, current=0)
    version, path = source.poll()
    assert version == 2 and (path / "config.json").read_text() == '{"v": 2}'
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == ["v2"]
    assert source.poll() is None  # nothing newer
