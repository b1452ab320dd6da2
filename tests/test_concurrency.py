"""Eight processes, one local layer directory, one bucket: every read whole, every object fetched once."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import traceback

import pytest

import castore
from castore.backends.file import FileBackend
from castore.format import keys
from castore.local_layer import LocalLayer
from castore.store import Store

PROCS = 8
NS = "conc"
SEEDED = {f"seeded-{i}": 1000 + i for i in range(3)}  # key -> data seed; ~2 MiB each, no shared chunks
SIZE = 2 << 20


def _data(seed: int, size: int = SIZE) -> bytes:
    rnd = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += rnd.randbytes(rnd.randrange(1, 32 << 10))
        out += b"%08x compressible artifact text\n" % rnd.randrange(1 << 32) * rnd.randrange(1, 500)
    return bytes(out[:size])


def _own(i: int) -> bytes:
    return _data(SEEDED["seeded-0"])[: 1 << 20] + _data(5000 + i, 256 << 10)  # half shared with seeded-0


def _open(url: str) -> Store:
    if url.startswith("file://"):
        # open_store puts no local layer in front of a local store; build one to share it the same way.
        return Store(LocalLayer(FileBackend(url[len("file://") :]), os.environ["CASTORE_CACHE_DIR"], 1 << 30), workers=4)
    return castore.open_store(url, workers=4)  # CASTORE_CACHE_DIR / CASTORE_CACHE_SIZE from the environment


def _sha(data: bytes | None) -> str | None:
    return hashlib.sha256(data).hexdigest() if data is not None else None


def _worker(i: int, url: str, barrier, results) -> None:  # noqa: ANN001 - multiprocessing proxies
    try:
        store = _open(url)
        layer = store.local
        assert layer is not None and layer.directory == os.path.abspath(os.environ["CASTORE_CACHE_DIR"])
        out: dict[str, object] = {"i": i}
        barrier.wait(timeout=120)
        # Phase 1: everybody reads the same entries at the same moment.
        out["seeded"] = {k: _sha(store.get(NS, k)) for k in SEEDED}
        out["seeded_misses"] = layer.stats.misses
        out["seeded_fetched"] = layer.stats.bytes_fetched
        barrier.wait(timeout=120)
        # Phase 2: everybody publishes the same key with the same bytes, and a key of its own.
        out["same_published"] = store.put(NS, "same", _data(77)).published
        out["own_published"] = store.put(NS, f"own-{i}", _own(i)).published
        barrier.wait(timeout=120)
        before = layer.stats.misses
        # Phase 3: everybody reads everything.
        out["same"] = _sha(store.get(NS, "same"))
        out["own"] = {j: _sha(store.get(NS, f"own-{j}")) for j in range(PROCS)}
        out["late_misses"] = layer.stats.misses - before
        store.close()
        results.put(out)
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put({"i": i, "error": traceback.format_exc()})


def _run(url: str, seed_store: Store, cache_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASTORE_CACHE_DIR", cache_dir)
    monkeypatch.setenv("CASTORE_CACHE_SIZE", "1G")
    manifests = [seed_store.put(NS, k, _data(seed)).manifest for k, seed in SEEDED.items()]
    seeded_chunks = {ref.digest for m in manifests for ref in m.chunks}
    seeded_bytes = sum(ref.stored_size for m in manifests for ref in m.chunks if ref.digest in seeded_chunks)
    assert len(seeded_chunks) == sum(len(m.chunks) for m in manifests) > 8  # no chunk shared between the keys

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCS)
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(i, url, barrier, results), daemon=True) for i in range(PROCS)]
    for p in procs:
        p.start()
    try:
        outs = [results.get(timeout=150) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    errors = [o["error"] for o in outs if "error" in o]
    assert not errors, errors[0]

    want = {k: _sha(_data(seed)) for k, seed in SEEDED.items()}
    want_own = {j: _sha(_own(j)) for j in range(PROCS)}
    for o in outs:
        assert o["seeded"] == want
        assert o["same"] == _sha(_data(77))
        assert o["own"] == want_own
        assert o["own_published"] is True
    assert sum(o["same_published"] for o in outs) == 1
    # Every chunk object (and each of the 3 manifests) came from the bucket exactly once, whoever asked first;
    # the other seven processes waited on the stripe lock and read the file it wrote.
    assert sum(o["seeded_misses"] for o in outs) == len(seeded_chunks) + len(SEEDED)
    manifest_bytes = sum(len(seed_store.backend.get(keys.manifest_path(NS, k))) for k in SEEDED)
    assert sum(o["seeded_fetched"] for o in outs) == seeded_bytes + manifest_bytes
    # Written entries were stored locally by their writers; later reads fetch each object at most once.
    distinct_late = {ref.digest for j in range(PROCS) for ref in seed_store.stat(NS, f"own-{j}").chunks}
    distinct_late |= {ref.digest for ref in seed_store.stat(NS, "same").chunks}
    assert sum(o["late_misses"] for o in outs) <= len(distinct_late) + PROCS + 1


@pytest.mark.s3
@pytest.mark.slow
def test_eight_processes_one_layer_one_bucket(s3_url: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    with castore.open_store(s3_url, cache_size=0) as seed_store:
        _run(s3_url, seed_store, str(tmp_path / "layer"), monkeypatch)


@pytest.mark.slow
def test_eight_processes_one_layer_file_backend(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    root = tmp_path / "store"
    with Store(FileBackend(str(root))) as seed_store:
        _run(f"file://{root}", seed_store, str(tmp_path / "layer"), monkeypatch)
