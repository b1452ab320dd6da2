"""The node-local read-through layer in front of a backend."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from castore.backends.base import Backend
from castore.backends.memory import MemoryBackend
from castore.errors import BackendError
from castore.format import keys
from castore.local_layer import EVICT_TO, LocalLayer
from castore.store import Store


class CountingBackend(Backend):
    """Wraps a backend, counts requests, and can be switched 'offline' (every call raises BackendError)."""

    def __init__(self, inner: Backend, delay: float = 0.0) -> None:
        self.inner = inner
        self.url = inner.url
        self.calls: Counter[str] = Counter()
        self.offline = False
        self.delay = delay

    def _call(self, op: str) -> None:
        self.calls[op] += 1
        if self.offline:
            raise BackendError(f"{self.url}: offline ({op})")
        if self.delay:
            time.sleep(self.delay)

    def get(self, path: str) -> bytes | None:
        self._call("get")
        return self.inner.get(path)

    def put(self, path: str, data: bytes, *, if_absent: bool = False) -> bool:
        self._call("put")
        return self.inner.put(path, data, if_absent=if_absent)

    def exists(self, path: str) -> bool:
        self._call("exists")
        return self.inner.exists(path)

    def delete(self, path: str) -> None:
        self._call("delete")
        self.inner.delete(path)

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        self._call("list")
        return self.inner.list(prefix)


def _rand(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def inner() -> CountingBackend:
    return CountingBackend(MemoryBackend())


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


def test_read_through_second_get_is_local(inner: CountingBackend, tmp_path: Path) -> None:
    data = _rand(500_000, seed=1)
    Store(inner.inner).put("ns", "k", data)  # written by another node: the layer holds nothing
    layer = LocalLayer(inner, str(tmp_path / "layer"), 1 << 30)
    store = Store(layer, workers=4)
    assert store.get("ns", "k") == data
    first = inner.calls["get"]
    assert first >= 2  # the manifest and the chunks
    assert layer.stats.misses == first
    assert store.get("ns", "k") == data
    assert inner.calls["get"] == first, "the second get asked the inner backend"
    assert layer.stats.hits == first
    assert store.stats_dict()["local_hits"] == first
    assert not _tmp_files(tmp_path)


def test_prefetch_fills_the_layer_so_later_gets_ask_nothing(inner: CountingBackend, tmp_path: Path) -> None:
    blobs = {"big": _rand(3 << 20, seed=2), "small": _rand(1000, seed=3), "mid": _rand(300_000, seed=4)}
    writer = Store(inner.inner)
    for key, data in blobs.items():
        writer.put("ns", key, data)
    layer = LocalLayer(inner, str(tmp_path / "layer"), 1 << 30)
    store = Store(layer, workers=4)
    assert store.prefetch("ns", [*blobs, "absent"]) == 3
    asked = inner.calls["get"]
    for key, data in blobs.items():
        assert store.get("ns", key) == data  # verified on this read, from the layer
    assert inner.calls["get"] == asked, "a get after the prefetch asked the inner backend"
    assert Store(inner.inner).prefetch("ns", blobs) == 0  # no local layer: nothing to fill


def test_writes_go_through_and_fill_the_layer(inner: CountingBackend, tmp_path: Path) -> None:
    layer = LocalLayer(inner, str(tmp_path / "layer"), 1 << 30)
    store = Store(layer, workers=2)
    data = _rand(200_000, seed=2)
    store.put("ns", "k", data)
    assert inner.inner.exists(keys.manifest_path("ns", "k"))
    gets = inner.calls["get"]
    assert store.get("ns", "k") == data
    assert inner.calls["get"] == gets  # what this node wrote it can read locally
    # Losing a first-writer-wins race drops the local copy, so the winner's manifest is read next time.
    other = Store(inner.inner)
    other.put("ns", "k2", b"winner")
    assert not store.put("ns", "k2", b"loser").published
    assert not layer.holds(keys.manifest_path("ns", "k2"))
    assert store.get("ns", "k2") == b"winner"
    store.delete("ns", "k")
    assert not layer.holds(keys.manifest_path("ns", "k"))
    assert store.get("ns", "k") is None


def test_lru_eviction_keeps_bound_and_evicts_least_recently_used(inner: CountingBackend, tmp_path: Path) -> None:
    size = 30_000
    bound = 200_000
    paths = [f"castore/v1/chunks/{i:02x}/obj{i}" for i in range(10)]
    for i, p in enumerate(paths):
        inner.inner.put(p, _rand(size, seed=i))
    layer = LocalLayer(inner, str(tmp_path / "layer"), bound)
    now = time.time()
    for i in range(6):  # 180 KB: under the bound
        assert layer.get(paths[i]) == _rand(size, seed=i)
        os.utime(layer.local_path(paths[i]), (now - 1000 + i, now - 1000 + i))  # o0 oldest ... o5 newest
    assert layer.usage() == (6, 6 * size)
    layer.get(paths[0])  # a local hit refreshes o0: now o1 is the least recently used
    assert inner.calls["get"] == 6
    layer.get(paths[6])  # 210 KB > bound: evict
    held = [i for i in range(10) if layer.holds(paths[i])]
    assert held == [0, 3, 4, 5, 6]
    files, nbytes = layer.usage()
    assert nbytes <= bound * EVICT_TO
    assert layer.stats.evicted_files == 2
    for i in range(7, 10):
        layer.get(paths[i])
        assert layer.usage()[1] <= bound
    assert layer.holds(paths[9])  # the newest object always stays
    # An evicted object is simply fetched again.
    before = inner.calls["get"]
    assert layer.get(paths[1]) == _rand(size, seed=1)
    assert inner.calls["get"] == before + 1


def test_corrupt_local_copy_is_dropped_and_refetched(inner: CountingBackend, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = _rand(300_000, seed=3)
    layer = LocalLayer(inner, str(tmp_path / "layer"), 1 << 30)
    store = Store(layer, workers=2)
    store.put("ns", "k", data)
    manifest = store.stat("ns", "k")
    assert manifest is not None
    victim = keys.chunk_path(manifest.chunks[0].digest)
    local = Path(layer.local_path(victim))
    good = local.read_bytes()
    broken = bytearray(good)
    broken[-1] ^= 0xFF
    local.write_bytes(bytes(broken))
    gets = inner.calls["get"]
    with caplog.at_level(logging.WARNING, logger="castore"):
        assert store.get("ns", "k") == data
    assert any("local copy" in r.getMessage() for r in caplog.records)
    assert inner.calls["get"] == gets + 1  # only the damaged chunk was refetched
    assert local.read_bytes() == good  # and the layer holds a good copy again
    assert store.get("ns", "k") == data
    assert inner.calls["get"] == gets + 1


def test_corrupt_local_manifest_is_dropped(inner: CountingBackend, tmp_path: Path) -> None:
    layer = LocalLayer(inner, str(tmp_path / "layer"), 1 << 30)
    store = Store(layer)
    store.put("ns", "k", b"small inline blob")
    local = Path(layer.local_path(keys.manifest_path("ns", "k")))
    local.write_bytes(b"\xc1 garbage")
    gets = inner.calls["get"]
    assert store.get("ns", "k") == b"small inline blob"  # the damaged local copy is dropped, the bucket's read once
    assert inner.calls["get"] == gets + 1
    assert local.read_bytes() == inner.inner.get(keys.manifest_path("ns", "k"))  # and the good copy kept
    assert store.get("ns", "k") == b"small inline blob"
    assert inner.calls["get"] == gets + 1


def test_offline_serves_what_the_layer_holds(inner: CountingBackend, tmp_path: Path) -> None:
    data = _rand(400_000, seed=4)
    Store(inner.inner).put("ns", "held", data)
    Store(inner.inner).put("ns", "not-held", b"elsewhere")
    layer = LocalLayer(inner, str(tmp_path / "layer"), 1 << 30)
    store = Store(layer, workers=2)
    assert store.get("ns", "held") == data
    inner.offline = True
    assert store.get("ns", "held") == data
    assert store.get_many("ns", ["held"]) == {"held": data}
    with pytest.raises(BackendError):
        store.get("ns", "not-held")  # an outage is an error, never a silent miss


def test_atomic_writes_leave_no_partial_files(inner: CountingBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    data = _rand(300_000, seed=5)
    Store(inner.inner).put("ns", "k", data)
    layer = LocalLayer(inner, str(tmp_path / "layer"), 1 << 30)
    store = Store(layer, workers=2)

    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with caplog.at_level(logging.WARNING, logger="castore"):
        assert store.get("ns", "k") == data  # a local disk failure does not fail the read
    assert any("cannot write" in r.getMessage() for r in caplog.records)
    assert layer.usage() == (0, 0)
    assert not _tmp_files(tmp_path)
    monkeypatch.undo()
    assert store.get("ns", "k") == data
    assert layer.usage()[0] > 0
    for p in (tmp_path / "layer" / "objects").rglob("*"):
        if p.is_file():
            assert not p.name.startswith(".tmp-")
    assert not _tmp_files(tmp_path)


def test_concurrent_readers_fetch_once(tmp_path: Path) -> None:
    inner = CountingBackend(MemoryBackend(), delay=0.05)
    inner.inner.put("castore/v1/x", b"payload")
    layer = LocalLayer(inner, str(tmp_path / "layer"), 1 << 30)
    results: list[bytes | None] = []
    threads = [threading.Thread(target=lambda: results.append(layer.get("castore/v1/x"))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [b"payload"] * 6
    assert inner.calls["get"] == 1


def test_clear_and_misses(inner: CountingBackend, tmp_path: Path) -> None:
    layer = LocalLayer(inner, str(tmp_path / "layer"), 1 << 30)
    assert layer.get("castore/v1/none") is None
    assert not layer.holds("castore/v1/none")
    inner.inner.put("castore/v1/a", b"a")
    layer.get("castore/v1/a")
    assert layer.usage() == (1, 1)
    layer.clear()
    assert layer.usage() == (0, 0)


def test_the_size_bound_holds_across_processes_sharing_one_layer(tmp_path: Path) -> None:
    """Each process used to count only what it wrote itself: two of them filled the layer to twice its bound."""
    bound = 300_000
    backing = MemoryBackend()
    paths = [f"castore/v1/chunks/{i:02x}/o{i}" for i in range(20)]
    for i, p in enumerate(paths):
        backing.put(p, _rand(25_000, seed=i))
    first = LocalLayer(CountingBackend(backing), str(tmp_path / "layer"), bound)
    second = LocalLayer(CountingBackend(backing), str(tmp_path / "layer"), bound)  # another process's view
    for i, p in enumerate(paths):
        (first if i % 2 else second).get(p)
        assert first.usage()[1] <= bound
    assert first.stats.evicted_files + second.stats.evicted_files > 0
    second.forget(paths[-1])
    held = first.usage()[1]
    assert int((tmp_path / "layer" / "usage").read_text()) == held  # the shared counter follows removals too


def test_eviction_removes_what_killed_writers_left(inner: CountingBackend, tmp_path: Path) -> None:
    layer = LocalLayer(inner, str(tmp_path / "layer"), 50_000)
    stale = Path(layer.local_path("castore/v1/chunks/aa/.tmp-killed"))
    fresh = Path(layer.local_path("castore/v1/chunks/aa/.tmp-in-flight"))
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x" * 1000)
    fresh.write_bytes(b"y" * 1000)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    inner.inner.put("castore/v1/big", _rand(60_000))
    layer.get("castore/v1/big")  # over the bound: evicts
    assert not stale.exists() and fresh.exists()
