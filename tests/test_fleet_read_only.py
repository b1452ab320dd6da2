"""Read-only fleet machines on a real S3 server with a read-only identity (no torch needed).

A machine configured read-only never sends a write. A machine whose credentials are read-only but whose
configuration is not stops writing at the first refusal, logs it once at info, keeps reading, and never warns.
Requests are seen by a recording proxy in front of SeaweedFS.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

import castore
from castore.config import load_config
from castore.errors import ReadOnlyError, is_access_denied
from castore.testing.faultproxy import FaultProxy
from castore.torch.recording import TouchRecorder, read_records
from castore.torch.session import StoreSession, castore_key

pytestmark = [pytest.mark.s3]

WRITES = ("PUT", "POST", "DELETE")


@pytest.fixture
def populated(seaweedfs: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A bucket with one entry written by the read-write identity; os.environ then holds the read-only one."""
    bucket = seaweedfs.create_bucket()
    url = seaweedfs.url(bucket, "fleet")
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    with castore.open_store(url, cache_size=0) as store:
        store.put("torch-test", castore_key("pt2:fx-graph-v1::present:c1"), b"compiled" * 5000)
    for name, value in seaweedfs.env(read_only=True).items():
        monkeypatch.setenv(name, value)
    return {"bucket": bucket}


def _session(tmp_path: Path, url: str, **overrides: object) -> StoreSession:
    config = load_config({"url": url, "cache_dir": str(tmp_path / "local"), "slow_request": 60.0, **overrides}, env={})
    return StoreSession(config, "torch-test")


def _writes(proxy: FaultProxy) -> list[str]:
    return [f"{r.method} {r.target}" for r in proxy.seen if r.method in WRITES]


def test_read_only_config_never_sends_a_write(seaweedfs: Any, populated: dict[str, Any], tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    with FaultProxy(seaweedfs.endpoint, record=True) as proxy:
        s = _session(tmp_path, f"s3://{populated['bucket']}/fleet?endpoint={proxy.endpoint}", read_only=True)
        with caplog.at_level(logging.INFO, logger="castore"):
            assert s.get("fx-graph", "pt2:fx-graph-v1::present:c1") == b"compiled" * 5000
            assert s.get("fx-graph", "pt2:fx-graph-v1::absent:c1") is None  # the anchor: a plan would be written
            for i in range(5):
                s.put("cpp-kernel", f"kernel-{i}", os.urandom(100_000))
            s.close()
        assert proxy.requests > 0 and _writes(proxy) == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_read_only_credentials_switch_the_process_to_read_only_quietly(
    seaweedfs: Any, populated: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with FaultProxy(seaweedfs.endpoint, record=True) as proxy:
        s = _session(tmp_path, f"s3://{populated['bucket']}/fleet?endpoint={proxy.endpoint}")
        with caplog.at_level(logging.INFO, logger="castore"):
            s.put("cpp-kernel", "kernel-0", os.urandom(4_000))  # inline: one PUT, refused
            assert s.flush(30)
            first = _writes(proxy)
            for i in range(1, 6):
                s.put("cpp-kernel", f"kernel-{i}", os.urandom(100_000))
            assert s.flush(30)
            # Reads go on: the refusal did not open the circuit breaker.
            assert s.get("fx-graph", "pt2:fx-graph-v1::present:c1") == b"compiled" * 5000
            s.close()
        assert len(first) == 1, first
        assert _writes(proxy) == first, "a write was attempted after the first refusal"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    infos = [r.getMessage() for r in caplog.records if "read-only from now on" in r.getMessage()]
    assert len(infos) == 1, caplog.text
    assert s.stats.caches["fx-graph"].hits == 1


def test_refusals_are_told_apart_from_faults() -> None:
    class Refused(castore.BackendError):
        status = 403
        code = "AccessDenied"

    assert is_access_denied(Refused("PUT x: HTTP 403 AccessDenied"))
    assert is_access_denied(ReadOnlyError("store is read-only"))
    assert not is_access_denied(castore.BackendError("PUT x: HTTP 503 SlowDown"))
    assert not is_access_denied(OSError("connection reset"))


def test_recorder_keeps_each_processes_entries_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASTORE_RECORD_DIR", str(tmp_path))
    a, b = TouchRecorder.from_environment(), TouchRecorder.from_environment()
    assert a is not None and b is not None
    for ns, key in [("n", "k1"), ("n", "k2"), ("n", "k1")]:
        a.note(ns, key)
    b.note("n", "k2")
    b.note("m", "k3")
    a.close()
    b.close()
    with open(next(tmp_path.glob("*.entries")), "a") as f:
        f.write('["n", "cut sh')  # a process killed mid-line
    assert sorted(read_records(str(tmp_path))) == [("m", "k3"), ("n", "k1"), ("n", "k2")]


def test_session_records_what_it_read_and_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "record"
    record.mkdir()
    monkeypatch.setenv("CASTORE_RECORD_DIR", str(record))
    s = _session(tmp_path, f"file://{tmp_path}/store")
    s.put("fx-graph", "pt2:fx-graph-v1::a:c1", b"a" * 100)
    assert s.flush(30)
    assert s.get("fx-graph", "pt2:fx-graph-v1::a:c1") == b"a" * 100
    assert s.get("fx-graph", "pt2:fx-graph-v1::missing:c1") is None  # a miss needs nothing
    s.put("cpp-kernel", "k/" * 300, b"k")  # a long key: recorded as the store's key for it
    s.close()
    assert read_records(str(record)) == [
        ("torch-test", "pt2:fx-graph-v1::a:c1"),
        ("torch-test", castore_key("k/" * 300)),
        ("torch-test", s.plan_key(("fx-graph", "pt2:fx-graph-v1::a:c1"))),  # the fetch plan it stored at exit
    ]
