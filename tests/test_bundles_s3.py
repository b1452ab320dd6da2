"""Bundles on a real S3 server: a pull is a handful of requests whatever the number of objects, it rides out
throttling, and a read-only identity can pull and prefetch. Requests are counted by a proxy in front of SeaweedFS."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import castore
from castore import bundles
from castore.backends.file import FileBackend
from castore.store import Store
from castore.testing.faultproxy import FaultProxy

pytestmark = [pytest.mark.s3]


@pytest.fixture
def published(seaweedfs: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A bundle over 40 entries (about 150 objects) published with the read-write identity."""
    bucket = seaweedfs.create_bucket()
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    with castore.open_store(seaweedfs.url(bucket, "p"), cache_size=0) as store:
        entries = []
        for i in range(40):
            store.put("torch-test", f"k{i}", os.urandom(150_000) if i % 4 else b"small %d" % i)
            entries.append(("torch-test", f"k{i}"))
        result = bundles.publish(store, "job", entries, {"torch": "test"})
    objects = len(result.bundle.index.manifests) + len(result.bundle.index.chunks)
    assert objects > 100
    for name, value in seaweedfs.env(read_only=True).items():  # from now on, a fleet machine's credentials
        monkeypatch.setenv(name, value)
    return {"bucket": bucket, "entries": entries, "objects": objects}


def test_pull_costs_a_handful_of_requests_with_read_only_credentials(seaweedfs: Any, published: dict[str, Any], tmp_path: Path) -> None:
    with FaultProxy(seaweedfs.endpoint, record=True) as proxy:
        store = castore.open_store(f"s3://{published['bucket']}/p?endpoint={proxy.endpoint}", cache_size=0)
        dest = FileBackend(str(tmp_path / "pulled"))
        report = bundles.pull(store, bundles.open_bundle(store, "job"), dest)
        store.close()
        seen = [f"{r.method} {r.target.split('?')[0]}" for r in proxy.seen]
    assert not report.bad and report.objects == published["objects"]
    assert len(seen) == 3, seen  # LIST the versions, GET the bundle manifest, one ranged GET of the pack
    assert all(s.startswith("GET") for s in seen), seen
    pulled = Store(dest, read_only=True)
    assert all(pulled.get(ns, k) is not None for ns, k in published["entries"])


def test_pull_rides_out_throttling(seaweedfs: Any, published: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundles, "PATIENT_BASE", 0.01)
    with FaultProxy(seaweedfs.endpoint) as proxy:
        # One attempt per request in the backend: every 503 reaches the bundle reader's own patience.
        store = castore.open_store(f"s3://{published['bucket']}/p?endpoint={proxy.endpoint}", cache_size=0, max_attempts=1)
        proxy.fail_next = 3
        report = bundles.pull(store, bundles.open_bundle(store, "job@1"), FileBackend(str(tmp_path / "pulled")))
        store.close()
        assert proxy.faulted == 3
    assert not report.bad and report.objects == published["objects"] and report.fallback_reads == 0


def test_prefetch_fills_the_local_layer_once_per_node(seaweedfs: Any, published: dict[str, Any], tmp_path: Path) -> None:
    with FaultProxy(seaweedfs.endpoint) as proxy:
        url = f"s3://{published['bucket']}/p?endpoint={proxy.endpoint}"
        store = castore.open_store(url, cache_dir=str(tmp_path / "local"))
        report = bundles.prefetch_into_local(store, "job")
        assert report is not None and report.objects == published["objects"] and proxy.requests == 3
        proxy.reset_counters()
        # Every lookup is now served by the node.
        assert all(store.get(ns, k) is not None for ns, k in published["entries"])
        assert proxy.requests == 0
        # Another process on the node (a compile worker) finds the bundle prefetched: no request at all.
        again = bundles.prefetch_into_local(castore.open_store(url, cache_dir=str(tmp_path / "local")), "job")
        assert again is not None and again.objects == 0 and proxy.requests == 0
        store.close()


def test_a_session_with_castore_bundle_serves_lookups_from_the_prefetched_bundle(
    seaweedfs: Any, published: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from castore.config import load_config
    from castore.torch.session import StoreSession

    monkeypatch.setenv("CASTORE_BUNDLE", "job")
    with FaultProxy(seaweedfs.endpoint, record=True) as proxy:
        url = f"s3://{published['bucket']}/p?endpoint={proxy.endpoint}"
        config = load_config({"url": url, "cache_dir": str(tmp_path / "local"), "slow_request": 60.0}, env={})
        session = StoreSession(config, "torch-test")
        session.prewarm()  # what castore.torch.install() does: opens the store, then prefetches the bundle
        # The first lookup waits (at most store_wait) for the prefetch; then every lookup is served by the node.
        assert all(session.get("fx-graph", key) is not None for _, key in published["entries"])
        session.close()
        seen = [f"{r.method} {r.target.split('?')[0]}" for r in proxy.seen]
    assert session.stats.prefetched == published["objects"]
    assert len(seen) == 3, seen
    assert session.stats.bucket_fetches == 1 and session.stats.local_hits > 0  # the bundle manifest, through the layer
