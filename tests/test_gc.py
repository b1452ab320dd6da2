"""Garbage collection, namespace removal and bucket accounting against a real SeaweedFS, and gc racing writers."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from pathlib import Path

import pytest

import castore
from castore import gc
from castore.backends.base import Backend
from castore.format import keys
from castore.format.manifest import Manifest
from castore.store import Store

# Tiny protocol times so objects age within a test: writers refresh chunks older than R, gc removes garbage
# older than G, gc's delete window (and the writers' re-check delay) D. G - 2R - 1 s leaves gc 2 s to sweep.
R, G, D = 1.0, 5.0, 0.5
GC_TIMES = {"grace": G, "refresh_age": R, "delete_window": D, "clock_skew": 0.0}


def _rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _open(url: str) -> Store:
    store = castore.open_store(url, cache_size=0)
    store.chunk_refresh_age = R
    store.chunk_recheck_delay = D
    return store


def _listing(seaweedfs, bucket: str, prefix: str = "prefix/") -> dict[str, tuple[int, str]]:  # noqa: ANN001
    """The bucket's own listing (boto3, not castore): key -> (size, etag)."""
    client = seaweedfs.client()
    out: dict[str, tuple[int, str]] = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                out[item["Key"]] = (item["Size"], item["ETag"])
    finally:
        client.close()
    return out


def _chunk_digests(store: Store, namespace: str, key: str) -> set[str]:
    manifest = store.stat(namespace, key)
    assert manifest is not None
    return {ref.digest.hex() for ref in manifest.chunks}


def _age_out() -> None:
    time.sleep(G + gc.MTIME_RESOLUTION + 0.2)


@pytest.mark.s3
@pytest.mark.slow
def test_gc_removes_exactly_the_unreferenced_old_chunks(seaweedfs, s3_bucket: str, s3_url: str) -> None:  # noqa: ANN001
    with _open(s3_url) as store:
        a = _rand(400_000, 1)
        b = a[:200_000] + _rand(200_000, 2)  # shares its first chunks with a
        store.put("ns", "a", a)
        store.put("ns", "b", b)
        kept_chunks = _chunk_digests(store, "ns", "a")
        old_garbage = _chunk_digests(store, "ns", "b") - kept_chunks
        assert old_garbage and _chunk_digests(store, "ns", "b") & kept_chunks
        store.delete("ns", "b")
        _age_out()
        store.put("ns", "young", _rand(300_000, 3))
        young_garbage = _chunk_digests(store, "ns", "young")
        store.delete("ns", "young")

        before = _listing(seaweedfs, s3_bucket)
        dry = gc.collect(store, dry_run=True, **GC_TIMES)
        assert _listing(seaweedfs, s3_bucket) == before  # a dry run changes nothing
        assert set(dry.chunks_removed) == old_garbage
        chunk_sizes = {k.rsplit("/", 1)[-1]: v[0] for k, v in before.items() if "/chunks/" in k}
        assert dry.chunk_bytes_freed == sum(chunk_sizes[d] for d in old_garbage)
        assert dry.young_garbage_chunks == len(young_garbage)

        report = gc.collect(store, **GC_TIMES)
        assert set(report.chunks_removed) == old_garbage
        assert report.chunk_bytes_freed == dry.chunk_bytes_freed
        assert not report.stopped_early and not report.lost_chunks
        after = _listing(seaweedfs, s3_bucket)
        remaining = {k.rsplit("/", 1)[-1] for k in after if "/chunks/" in k}
        assert remaining == kept_chunks | young_garbage
        assert store.get("ns", "a") == a
        assert store.verify().ok

        # du counts what the bucket's own listing holds, referenced and garbage apart.
        usage = gc.bucket_usage(store)
        assert usage.total_bytes == sum(size for size, _ in after.values())
        assert usage.chunk_objects == len(remaining)
        assert usage.garbage_objects == len(young_garbage)
        assert usage.garbage_bytes == sum(after[keys.chunk_path(bytes.fromhex(d)).replace("castore/", "prefix/castore/", 1)][0] for d in young_garbage)
        assert usage.referenced_objects == len(kept_chunks)


@pytest.mark.s3
@pytest.mark.slow
def test_keep_age_expires_old_entries_but_not_those_a_bundle_names(seaweedfs, s3_bucket: str, s3_url: str) -> None:  # noqa: ANN001
    with _open(s3_url) as store:
        named, unnamed = _rand(200_000, 4), _rand(200_000, 5)
        store.put("ns", "named", named)
        store.put("ns", "unnamed", unnamed)
        unnamed_chunks = _chunk_digests(store, "ns", "unnamed")
        bundle = Manifest(namespace="bundles", key="job", size=0, digest=bytes(32), kind="bundle", refs=[("ns", "named")])
        bundle.inline = b"CAS\x00"
        import hashlib

        bundle.digest = hashlib.sha256(b"").digest()
        assert store.backend.put(keys.manifest_path("bundles", "job"), bundle.to_bytes())
        _age_out()
        store.put("ns", "fresh", _rand(100, 6))

        dry = gc.collect(store, keep_age=G, dry_run=True, **GC_TIMES)
        assert dry.manifests_expired == ["ns/unnamed"] and dry.bundles == 1
        assert set(dry.chunks_removed) == unnamed_chunks
        report = gc.collect(store, keep_age=G, **GC_TIMES)
        assert report.manifests_expired == ["ns/unnamed"]
        assert set(report.chunks_removed) == unnamed_chunks
        assert sorted(k for _, k, _ in store.list("ns")) == ["fresh", "named"]
        assert store.get("ns", "named") == named
        usage = gc.bucket_usage(store)
        assert usage.garbage_objects == 0 and usage.missing_chunks == 0
        assert usage.total_bytes == sum(size for size, _ in _listing(seaweedfs, s3_bucket).values())


@pytest.mark.s3
def test_rm_namespace_removes_every_key_and_gc_then_frees_the_chunks(s3_url: str, tmp_path: Path) -> None:
    with _open(s3_url) as store:
        for i in range(5):
            store.put("gone", f"k{i}", _rand(50_000, 10 + i))
        store.put("stays", "k", _rand(50_000, 20))
        assert gc.delete_namespace(store, "gone") == 5
        assert list(store.list("gone")) == [] and store.get("stays", "k") is not None
        usage = gc.bucket_usage(store)
        assert usage.manifests == 1 and usage.garbage_objects > 0


def test_grace_shorter_than_twice_the_refresh_age_is_refused(tmp_path: Path) -> None:
    with castore.open_store(f"file://{tmp_path}/s") as store, pytest.raises(castore.ConfigError):
        gc.collect(store, grace=10 * 3600.0)


def test_gc_refuses_to_sweep_past_a_manifest_of_a_newer_format(tmp_path: Path) -> None:
    import msgpack

    with castore.open_store(f"file://{tmp_path}/s") as store:
        store.put("ns", "k", _rand(100_000, 7))
        store.backend.put(keys.manifest_path("ns", "future"), msgpack.packb({"format": 99}))
        for path, _ in store.backend.list(keys.ROOT + "/chunks/"):
            full = os.path.join(tmp_path, "s", path)
            os.utime(full, (time.time() - 10 * 86400,) * 2)
        with pytest.raises(castore.FormatError, match="newer format"):
            gc.collect(store)


# -- the race: a writer publishing an entry that reuses old garbage chunks while gc sweeps ------------------
TRIALS = int(os.environ.get("CASTORE_GC_RACE_TRIALS", "100"))


def _race(url_of, trials: int, *, refresh: bool) -> tuple[int, int]:  # noqa: ANN001
    """Run ``trials`` independent races, each in its own repository (bucket prefix). Returns (lost, trials)."""
    blobs = [_rand(150_000, 1000 + i) for i in range(trials)]
    stores = [_open(url_of(i)) for i in range(trials)]
    try:
        for store, blob in zip(stores, blobs):
            store.put("ns", "k", blob)
            store.delete("ns", "k")  # every chunk is garbage now...
        _age_out()  # ...and older than the grace period
        lost = 0
        lock = threading.Lock()

        def trial(i: int) -> None:
            nonlocal lost
            store, blob = stores[i], blobs[i]
            if not refresh:
                store.chunk_refresh_age = float("inf")
            rng = random.Random(i)
            errors: list[BaseException] = []

            def writer() -> None:
                time.sleep(rng.uniform(0, 0.15))
                try:
                    store.put("ns", "k", blob)
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)

            def collector() -> None:
                time.sleep(rng.uniform(0, 0.15))
                try:
                    gc.collect(store, **GC_TIMES)
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)

            threads = [threading.Thread(target=writer), threading.Thread(target=collector)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not errors, errors
            if store.get("ns", "k") != blob:
                with lock:
                    lost += 1

        batch = 10
        for start in range(0, trials, batch):
            workers = [threading.Thread(target=trial, args=(i,)) for i in range(start, min(trials, start + batch))]
            for w in workers:
                w.start()
            for w in workers:
                w.join(120)
        return lost, trials
    finally:
        for store in stores:
            store.close()


@pytest.mark.s3
@pytest.mark.slow
def test_a_writer_racing_gc_never_loses_a_chunk(seaweedfs, s3_bucket: str, s3_env, monkeypatch, caplog) -> None:  # noqa: ANN001
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    caplog.set_level(logging.WARNING, logger="castore")
    lost, trials = _race(lambda i: seaweedfs.url(s3_bucket, f"race-{i}"), TRIALS, refresh=True)
    restored = sum("removed by a concurrent gc" in r.getMessage() for r in caplog.records)
    print(f"gc race: {trials} trials, {lost} entries lost, {restored} refreshed chunks restored by the writer's re-check")
    assert lost == 0


# -- the command line -------------------------------------------------------------------------------------
def _cli(url: str, *args: str):  # noqa: ANN202
    from click.testing import CliRunner

    from castore.cli import main

    return CliRunner().invoke(main, ["--url", url, *args], catch_exceptions=False)


def _age_files(root: Path, seconds: float) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (time.time() - seconds,) * 2)


def test_cli_rm_namespace_du_and_gc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    for name in list(os.environ):
        if name.startswith("CASTORE_"):
            monkeypatch.delenv(name)
    url = f"file://{tmp_path}/s"
    (tmp_path / "a").write_bytes(_rand(300_000, 30))
    (tmp_path / "b").write_bytes(_rand(300_000, 31))
    for key in ("a", "b"):
        assert _cli(url, "put", "ns", key, str(tmp_path / key)).exit_code == 0
    assert _cli(url, "put", "other", "a", str(tmp_path / "a")).exit_code == 0
    result = _cli(url, "rm", "ns", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == {"namespace": "ns", "deleted": 2}
    assert _cli(url, "rm", "ns").exit_code == 1  # no such namespace

    du = json.loads(_cli(url, "du", "--json").stdout)["bucket"]
    on_disk = sum(p.stat().st_size for p in (tmp_path / "s").rglob("*") if p.is_file())
    assert du["total_bytes"] == on_disk and du["garbage_objects"] > 0 and du["manifests"] == 1

    # Young garbage stays; old garbage goes, dry run first.
    assert json.loads(_cli(url, "gc", "--json").stdout)["chunks_removed"] == []
    _age_files(tmp_path / "s", 3 * 86400)
    dry = json.loads(_cli(url, "gc", "--dry-run", "--json").stdout)
    assert len(dry["chunks_removed"]) == du["garbage_objects"] and dry["bytes_freed"] == du["garbage_bytes"]
    assert sum(p.stat().st_size for p in (tmp_path / "s").rglob("*") if p.is_file()) == on_disk
    text = _cli(url, "gc").output
    assert f"removed 0 of 1 entries and {du['garbage_objects']} of" in text
    after = json.loads(_cli(url, "du", "--json").stdout)["bucket"]
    assert after["garbage_objects"] == 0 and after["total_bytes"] == on_disk - du["garbage_bytes"]
    assert _cli(url, "get", "other", "a", str(tmp_path / "out")).exit_code == 0
    assert (tmp_path / "out").read_bytes() == (tmp_path / "a").read_bytes()

    # --keep-days removes entries older than N days, then their chunks.
    report = json.loads(_cli(url, "gc", "--keep-days", "1", "--json").stdout)
    assert report["manifests_expired"] == ["other/a"]
    assert json.loads(_cli(url, "du", "--json").stdout)["bucket"]["total_bytes"] == 0
    assert _cli(url, "gc", "--grace", "1").exit_code == 2  # shorter than twice the refresh age


class _DeleteGate(Backend):
    """A real file backend whose DELETEs wait for a gate: holds gc between its HEAD and its DELETE."""

    def __init__(self, inner: Backend) -> None:
        self.inner, self.url, self.gate, self.waiting = inner, inner.url, threading.Event(), threading.Event()

    def get(self, path: str) -> bytes | None:
        return self.inner.get(path)

    def put(self, path: str, data: bytes, *, if_absent: bool = False) -> bool:
        return self.inner.put(path, data, if_absent=if_absent)

    def exists(self, path: str) -> bool:
        return self.inner.exists(path)

    def head(self, path: str):  # noqa: ANN201
        return self.inner.head(path)

    def delete(self, path: str) -> None:
        if "/chunks/" in path:
            self.waiting.set()
            assert self.gate.wait(30)
        self.inner.delete(path)

    def list(self, prefix: str):  # noqa: ANN201
        return self.inner.list(prefix)

    def scan(self, prefix: str):  # noqa: ANN201
        return self.inner.scan(prefix)


def _gc_held_between_head_and_delete(root: Path, blob: bytes, refresh: bool, caplog) -> tuple[Store, gc.GcReport, int]:  # noqa: ANN001
    """Force the narrowest interleaving: gc reads the old time of a garbage chunk, the writer publishes an entry
    that reuses the chunk, then gc's DELETE lands. Returns (the writer's store, gc's report, chunks re-uploaded)."""
    from castore.backends.file import FileBackend

    with castore.open_store(f"file://{root}") as store:
        store.put("ns", "k", blob)
        store.delete("ns", "k")
    _age_files(root, 3 * 86400)  # garbage, older than any grace period
    gated = _DeleteGate(FileBackend(str(root)))
    gc_store, writer = Store(gated), castore.open_store(f"file://{root}")
    writer.chunk_recheck_delay = 1.0
    if not refresh:
        writer.chunk_refresh_age = float("inf")
    reports: list[gc.GcReport] = []
    collector = threading.Thread(target=lambda: reports.append(gc.collect(gc_store, grace=20 * 3600.0, delete_window=1.0)))
    collector.start()
    assert gated.waiting.wait(30)  # gc has HEADed a chunk (old) and is about to delete it
    caplog.set_level(logging.WARNING, logger="castore")
    put = threading.Thread(target=lambda: writer.put("ns", "k", blob))
    put.start()
    deadline = time.time() + 30
    while not writer.contains("ns", "k") and time.time() < deadline:
        time.sleep(0.01)
    gated.gate.set()  # the deletes land after the writer's publish
    put.join(30)
    collector.join(30)
    gc_store.close()
    restored = sum("removed by a concurrent gc" in r.getMessage() for r in caplog.records)
    return writer, reports[0], restored


def test_a_chunk_refreshed_between_gcs_head_and_its_delete_is_uploaded_again(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    blob = _rand(200_000, 40)
    writer, report, restored = _gc_held_between_head_and_delete(tmp_path / "s", blob, True, caplog)
    with writer:
        assert restored and len(report.chunks_removed) == restored and report.lost_chunks == []
        assert writer.get("ns", "k") == blob and writer.verify().ok


def test_without_the_refresh_that_interleaving_loses_the_entry(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """What the protocol prevents: a writer that reuses an old chunk as is publishes an entry gc then breaks."""
    blob = _rand(200_000, 40)
    writer, report, restored = _gc_held_between_head_and_delete(tmp_path / "s", blob, False, caplog)
    with writer:
        assert restored == 0 and report.chunks_removed
        assert writer.get("ns", "k") is None and not writer.verify().ok


def test_an_unreadable_manifest_stops_gc_unless_told_to_ignore_it(tmp_path: Path) -> None:
    with castore.open_store(f"file://{tmp_path}/s") as store:
        store.put("ns", "k", _rand(100_000, 8))
        store.put("ns", "gone", _rand(100_000, 9))
        store.delete("ns", "gone")
        store.backend.put(keys.manifest_path("ns", "broken"), b"\x93not a manifest")
        _age_files(tmp_path / "s", 3 * 86400)
        dry = gc.collect(store, dry_run=True)
        assert dry.unreadable_manifests and "would refuse" in dry.stopped_early
        before = sorted(store.backend.list(keys.ROOT + "/chunks/"))
        with pytest.raises(gc.GcRefused, match="cannot be read"):
            gc.collect(store)
        assert sorted(store.backend.list(keys.ROOT + "/chunks/")) == before  # nothing deleted
        report = gc.collect(store, ignore_unreadable=True)
        assert report.chunks_removed and store.get("ns", "k") is not None
