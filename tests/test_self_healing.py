"""Self-healing integrity: a bad object is detected once, never kept in the local layer, refetched at most once,
then a miss that costs no request; a re-put (or verify --repair) heals it."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from castore.backends import open_backend
from castore.backends.file import FileBackend
from castore.backends.memory import MemoryBackend
from castore.cli import main
from castore.format import codec as codecs
from castore.format import keys
from castore.local_layer import LocalLayer
from castore.store import Store

from integrity_helpers import CountingBackend, flip_bit

NS = "heal"


def _rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _layered(inner: CountingBackend, tmp_path: Path, name: str = "layer") -> Store:
    return Store(LocalLayer(inner, str(tmp_path / name), 1 << 30), workers=4)


def _chunk(store: Store, key: str, i: int = 0) -> str:
    m = store.stat(NS, key)
    assert m is not None and m.inline is None
    return keys.chunk_path(m.chunks[i].digest)


def _warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(1 for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage())


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_bad_bucket_chunk_behind_the_layer_is_one_get_one_warning_then_no_requests(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    bucket = MemoryBackend()
    data = _rand(400_000, seed=1)
    Store(bucket).put(NS, "k", data)
    writer = Store(bucket)
    path = _chunk(writer, "k", 1)
    good = bucket.get(path)
    bad = {"flip": flip_bit(good, 8 * len(good) - 3), "truncate": good[: len(good) // 2], "empty": b""}[damage]
    bucket.put(path, bad)
    inner = CountingBackend(bucket)
    store = _layered(inner, tmp_path)
    with caplog.at_level(logging.WARNING, logger="castore"):
        assert store.get(NS, "k") is None
        asked = sum(inner.calls.values())
        assert store.get(NS, "k") is None
        assert store.get_many(NS, ["k"]) == {"k": None}
        assert store.get_file(NS, "k", tmp_path / "out") is False
        assert store.prefetch(NS, ["k"]) == 0
    assert inner.gets_of(path) == 1
    assert sum(inner.calls.values()) == asked, "the process asked again for an entry it knows is bad"
    assert not store.local.holds(path)  # type: ignore[union-attr]
    assert _warnings_about(caplog, path.rsplit("/", 1)[1]) == 1
    assert _warnings_about(caplog, "") == 1
    assert store.stats.corrupt == 1
    assert not (tmp_path / "out").exists()
    # A re-put by this process heals the bucket (the chunk exists, but this process found it bad).
    store.put(NS, "k", data)
    assert bucket.get(path) == good
    assert store.get(NS, "k") == data
    assert Store(bucket).get(NS, "k") == data


def test_bad_local_copy_and_bad_bucket_copy_cost_one_get(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bucket = MemoryBackend()
    data = _rand(300_000, seed=2)
    inner = CountingBackend(bucket)
    store = _layered(inner, tmp_path)
    store.put(NS, "k", data)
    path = _chunk(store, "k")
    local = Path(store.local.local_path(path))  # type: ignore[union-attr]
    local.write_bytes(flip_bit(local.read_bytes(), 100))
    bucket.put(path, b"CAS\x01not zstd")
    reader = _layered(inner, tmp_path)
    before = inner.gets_of(path)
    with caplog.at_level(logging.WARNING, logger="castore"):
        assert reader.get(NS, "k") is None
        assert reader.get(NS, "k") is None
    assert inner.gets_of(path) - before == 1
    assert not local.exists()


def test_corrupt_local_copy_is_refetched_once_and_admitted_only_after_verification(tmp_path: Path) -> None:
    bucket = MemoryBackend()
    data = _rand(600_000, seed=3)
    Store(bucket).put(NS, "k", data)
    inner = CountingBackend(bucket)
    store = _layered(inner, tmp_path)
    assert store.get(NS, "k") == data
    for i, ref in enumerate(store.stat(NS, "k").chunks):  # type: ignore[union-attr]
        local = Path(store.local.local_path(keys.chunk_path(ref.digest)))  # type: ignore[union-attr]
        local.write_bytes(local.read_bytes()[:-1] if i % 2 else flip_bit(local.read_bytes(), 77))
    fresh = _layered(inner, tmp_path)
    gets = inner.calls["get"]
    assert fresh.get(NS, "k") == data
    assert inner.calls["get"] - gets == len(fresh.stat(NS, "k").chunks)  # type: ignore[union-attr]
    assert fresh.get(NS, "k") == data
    assert inner.calls["get"] - gets == len(fresh.stat(NS, "k").chunks)  # type: ignore[union-attr]


def test_prefetch_verifies_what_it_admits(tmp_path: Path) -> None:
    bucket = MemoryBackend()
    Store(bucket).put(NS, "k", _rand(300_000, seed=4))
    path = _chunk(Store(bucket), "k")
    bucket.put(path, flip_bit(bucket.get(path), 999))
    store = _layered(CountingBackend(bucket), tmp_path)
    assert store.prefetch(NS, ["k"]) == 0
    assert not store.local.holds(path)  # type: ignore[union-attr]
    assert path in store.bad_objects


def test_layer_never_admits_a_corrupt_manifest_or_chunk_through_plain_get(tmp_path: Path) -> None:
    bucket = MemoryBackend()
    Store(bucket).put(NS, "k", _rand(300_000, seed=5))
    path = _chunk(Store(bucket), "k")
    store = _layered(CountingBackend(bucket), tmp_path)
    mpath = keys.manifest_path(NS, "k")
    bucket.put(mpath, bucket.get(mpath)[:-3])
    bucket.put(path, flip_bit(bucket.get(path), 50))
    assert store.get(NS, "k") is None
    layer = store.local
    assert layer is not None and not layer.holds(mpath)
    assert layer.get(path) is not None  # plain get hands the bytes back (the caller verifies) ...
    assert not layer.holds(path)  # ... but does not keep them
    assert layer.stats.rejected == 2


def test_local_manifest_with_a_wrong_digest_is_dropped_and_read_once_from_the_bucket(tmp_path: Path) -> None:
    bucket = MemoryBackend()
    data = _rand(200_000, seed=6)
    inner = CountingBackend(bucket)
    store = _layered(inner, tmp_path)
    store.put(NS, "k", data)
    mpath = keys.manifest_path(NS, "k")
    m = store.stat(NS, "k")
    assert m is not None
    m.digest = bytes(32)  # parses, but describes other bytes
    Path(store.local.local_path(mpath)).write_bytes(m.to_bytes())  # type: ignore[union-attr]
    reader = _layered(inner, tmp_path)
    before = inner.gets_of(mpath)
    assert reader.get(NS, "k") == data
    assert inner.gets_of(mpath) - before == 1
    assert reader.get(NS, "k") == data
    assert inner.gets_of(mpath) - before == 1


@pytest.mark.parametrize("force", [False, True])
def test_a_torn_chunk_is_healed_by_a_re_put(tmp_path: Path, force: bool) -> None:
    store = Store(FileBackend(str(tmp_path / "store")), workers=2)
    data = _rand(300_000, seed=7)
    store.put(NS, "k", data)
    path = _chunk(store, "k")
    store.backend.put(path, b"")  # a writer killed after sending the headers
    reader = Store(FileBackend(str(tmp_path / "store")))
    assert reader.get(NS, "k") is None
    result = Store(FileBackend(str(tmp_path / "store"))).put(NS, "k", data, overwrite=force)
    assert result.chunks_uploaded == 1
    assert Store(FileBackend(str(tmp_path / "store"))).get(NS, "k") == data


def test_bit_rot_is_healed_by_a_re_put_where_the_backend_reports_md5() -> None:
    bucket = MemoryBackend()  # reports MD5 (default head)
    data = _rand(300_000, seed=8)
    Store(bucket).put(NS, "k", data)
    path = _chunk(Store(bucket), "k")
    bucket.put(path, flip_bit(bucket.get(path), 4000))
    assert Store(bucket).put(NS, "k", data).chunks_uploaded == 1
    assert Store(bucket).get(NS, "k") == data


def test_a_valid_other_encoding_of_a_chunk_is_kept() -> None:
    bucket = CountingBackend(MemoryBackend())
    data = b"compressible text\n" * 20_000
    Store(bucket).put(NS, "k", data)
    m = Store(bucket).stat(NS, "k")
    assert m is not None
    path = keys.chunk_path(m.chunks[0].digest)
    raw = codecs.MAGIC + b"\x00" + codecs.decode_chunk(bucket.get(path), m.chunks[0].digest, m.chunks[0].size)
    bucket.inner.put(path, raw)  # another writer's raw encoding: valid, different size and MD5
    puts = bucket.by_path[("put", path)]
    assert Store(bucket).put(NS, "k2", data).chunks_uploaded == 0
    assert bucket.by_path[("put", path)] == puts
    assert Store(bucket).get(NS, "k2") == data


def test_a_torn_manifest_is_replaced_by_a_re_put_without_force() -> None:
    bucket = MemoryBackend()
    Store(bucket).put(NS, "k", b"first version")
    bucket.put(keys.manifest_path(NS, "k"), b"")
    assert Store(bucket).get(NS, "k") is None
    assert Store(bucket).put(NS, "k", b"first version").published
    assert Store(bucket).get(NS, "k") == b"first version"
    # A valid manifest still stands (first writer wins).
    assert not Store(bucket).put(NS, "k", b"other").published


def test_verify_repair_uploads_from_the_local_layer_and_removes_what_it_cannot_repair(tmp_path: Path) -> None:
    bucket = MemoryBackend()
    store = _layered(CountingBackend(bucket), tmp_path)
    held, lost = _rand(300_000, seed=9), _rand(300_000, seed=10)
    store.put(NS, "held", held)  # this node wrote it: its layer holds every chunk
    Store(bucket).put(NS, "lost", lost)  # another node's entry
    Store(bucket).put(NS, "inline", b"tiny")
    held_chunk, lost_chunk = _chunk(store, "held"), _chunk(Store(bucket), "lost")
    bucket.put(held_chunk, flip_bit(bucket.get(held_chunk), 5))
    bucket.put(lost_chunk, b"")
    bucket.put(keys.manifest_path(NS, "broken"), b"\xc1")
    report = store.verify()
    assert not report.ok and report.unresolved
    report = store.verify(repair=True)
    assert len(report.bad) >= 3
    assert report.repaired == [f"chunk {held_chunk.rsplit('/', 1)[1]}"]
    assert set(report.removed) == {f"chunk {lost_chunk.rsplit('/', 1)[1]}", f"manifest {NS}/lost", f"manifest {NS}/broken"}
    assert report.unresolved == 0
    assert store.verify().ok
    assert Store(bucket).get(NS, "held") == held and Store(bucket).get(NS, "inline") == b"tiny"
    assert Store(bucket).get(NS, "lost") is None
    Store(bucket).put(NS, "lost", lost)  # the next writer publishes it again
    assert Store(bucket).get(NS, "lost") == lost


def test_cli_verify_repair_reports_json_and_exit_codes(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'store'}"
    store = Store(open_backend(url))
    store.put(NS, "k", _rand(300_000, seed=11))
    path = _chunk(store, "k")
    store.backend.put(path, b"CAS")
    runner = CliRunner()
    env = {"CASTORE_URL": url, "CASTORE_CACHE_DIR": str(tmp_path / "layer")}
    failed = runner.invoke(main, ["verify", "--json"], env=env)
    assert failed.exit_code == 3
    repaired = runner.invoke(main, ["verify", "--repair", "--json"], env=env)
    assert repaired.exit_code == 0, repaired.output
    doc = json.loads(repaired.stdout)
    assert doc["removed"] == [f"chunk {path.rsplit('/', 1)[1]}", f"manifest {NS}/k"] and doc["unresolved"] == 0
    assert runner.invoke(main, ["verify"], env=env).exit_code == 0


def test_a_bad_chunk_repeated_within_one_blob_is_fetched_once(tmp_path: Path) -> None:
    bucket = MemoryBackend()
    block = _rand(70_000, seed=12)
    data = block * 10  # the same chunks, again and again
    writer = Store(bucket)
    writer.put(NS, "k", data)
    m = writer.stat(NS, "k")
    assert m is not None and len({r.digest for r in m.chunks}) < len(m.chunks)
    repeated = next(r for r in m.chunks if sum(x.digest == r.digest for x in m.chunks) > 1)
    path = keys.chunk_path(repeated.digest)
    bucket.put(path, b"")
    inner = CountingBackend(bucket)
    assert _layered(inner, tmp_path).get(NS, "k") is None
    assert inner.gets_of(path) == 1


@pytest.mark.s3
def test_on_seaweedfs_one_corrupt_chunk_costs_one_get_and_one_warning_then_a_re_put_heals(
    s3_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = open_backend(s3_url)
    data = _rand(500_000, seed=13)
    Store(base).put(NS, "k", data)
    path = _chunk(Store(base), "k", 2)
    good = base.get(path)
    base.put(path, good[: len(good) - 100])  # what a server that sends fewer bytes without Content-Length gives
    inner = CountingBackend(base)
    store = _layered(inner, tmp_path)
    with caplog.at_level(logging.WARNING, logger="castore"):
        for _ in range(3):
            assert store.get(NS, "k") is None
        assert store.get_file(NS, "k", tmp_path / "out") is False
    assert inner.gets_of(path) == 1
    assert _warnings_about(caplog, path.rsplit("/", 1)[1]) == 1
    assert _warnings_about(caplog, "") == 1, "one warning in all, naming the chunk and the entry"
    assert not store.local.holds(path)  # type: ignore[union-attr]
    result = Store(base).put(NS, "k", data)  # another process's re-put: the HEAD shows the wrong size
    assert result.chunks_uploaded == 1
    assert _layered(CountingBackend(base), tmp_path, "other").get(NS, "k") == data
    base.close()


def test_cli_get_of_a_corrupt_entry_behind_the_layer_exits_3_with_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """castore get used to refetch the chunk ~980 times, then exit 1 with a RecursionError traceback."""
    bucket = tmp_path / "bucket"
    store = Store(FileBackend(str(bucket)))
    store.put(NS, "k", _rand(300_000, seed=14))
    path = _chunk(store, "k")
    store.backend.put(path, flip_bit(store.backend.get(path), 9))
    # A local layer in front of a file:// store, as open_store builds for s3://.
    monkeypatch.setattr("castore.open_store", lambda *a, **kw: _layered(CountingBackend(FileBackend(str(bucket))), tmp_path))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["--url", f"file://{bucket}", "get", NS, "k", "out"])
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    assert result.output.count(path.rsplit("/", 1)[1]) == 1
    assert not (tmp_path / "out").exists()


def test_cli_get_heals_a_damaged_local_manifest_in_one_invocation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = tmp_path / "bucket"
    data = _rand(100_000, seed=15)
    Store(FileBackend(str(bucket))).put(NS, "k", data)
    store = _layered(CountingBackend(FileBackend(str(bucket))), tmp_path)
    assert store.get(NS, "k") == data
    Path(store.local.local_path(keys.manifest_path(NS, "k"))).write_bytes(b"\x00")  # type: ignore[union-attr]
    monkeypatch.setattr("castore.open_store", lambda *a, **kw: _layered(CountingBackend(FileBackend(str(bucket))), tmp_path))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["--url", f"file://{bucket}", "get", NS, "k", "out"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out").read_bytes() == data
    Store(FileBackend(str(bucket))).backend.put(keys.manifest_path(NS, "k"), b"\xc1")
    Path(store.local.local_path(keys.manifest_path(NS, "k"))).unlink()  # type: ignore[union-attr]
    assert CliRunner().invoke(main, ["--url", f"file://{bucket}", "get", NS, "k", "out2"]).exit_code == 3
