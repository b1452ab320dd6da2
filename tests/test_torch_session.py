"""StoreSession, the torch integration's view of the store: never raises, bounded waits, background writes,
fork safety. No torch needed."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from castore.config import load_config
from castore.torch.session import StoreSession, castore_key


def _session(tmp_path: Path, url: str | None = None, **overrides: object) -> StoreSession:
    config = load_config({"url": url or f"file://{tmp_path}/store", "cache_dir": str(tmp_path / "local"), **overrides}, env={})
    return StoreSession(config, "torch-test")


def test_put_is_background_and_get_reads_it_back(tmp_path: Path) -> None:
    s = _session(tmp_path)
    s.put("fx-graph", "pt2:fx-graph-v1::fabc:c1", b"payload" * 1000)
    assert s.flush(30)
    assert s.get("fx-graph", "pt2:fx-graph-v1::fabc:c1") == b"payload" * 1000
    c = s.stats.caches["fx-graph"]
    assert (c.puts, c.hits, c.misses) == (1, 1, 0)
    assert s.get("fx-graph", "pt2:fx-graph-v1::other:c1") is None
    assert s.stats.caches["fx-graph"].misses == 1


def test_long_or_exotic_torch_keys_are_hashed_not_rejected(tmp_path: Path) -> None:
    key = "pt2:autotune::" + "/x" * 2000
    assert castore_key(key).startswith("sha256-")
    s = _session(tmp_path)
    s.put("autotune", key, b"{}")
    assert s.flush(30)
    assert s.get("autotune", key) == b"{}"


def test_unreachable_store_costs_one_warning_then_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    # A closed port on loopback: connection refused at once.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    s = _session(tmp_path, "s3://bucket/p?endpoint=http://127.0.0.1:9", connect_timeout=1, max_attempts=1)
    with caplog.at_level(logging.WARNING, logger="castore.torch"):
        start = time.monotonic()
        for i in range(20):
            assert s.get("fx-graph", f"k{i}") is None
        elapsed = time.monotonic() - start
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    c = s.stats.caches["fx-graph"]
    assert c.get_errors == 1 and c.skipped == 19
    assert elapsed < 10


def test_slow_store_opens_the_breaker(tmp_path: Path) -> None:
    s = _session(tmp_path, slow_request=0.0)  # every get counts as slow
    assert s.get("fx-graph", "k") is None
    assert not s.available()
    assert s.get("fx-graph", "k2") is None
    assert s.stats.caches["fx-graph"].skipped == 1


def test_read_only_session_never_writes(tmp_path: Path) -> None:
    s = _session(tmp_path, read_only=True)
    s.put("fx-graph", "k", b"x")
    assert s.flush(5)
    assert s.stats.caches["fx-graph"].puts == 0


def test_forked_child_gets_its_own_store_and_writer(tmp_path: Path) -> None:
    """Inductor's compile workers fork: a store opened (or being opened) in the parent must not leak into the child."""
    s = _session(tmp_path)
    s.prewarm()
    pid = os.fork()
    if pid == 0:  # child: put through the session and exit with the result
        try:
            s.put("autotune", "child-key", b"from the child")
            ok = s.flush(30) and s.stats.caches["autotune"].puts == 1
        except BaseException:  # noqa: BLE001
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert s.get("autotune", "child-key") == b"from the child"


def test_a_hung_store_costs_at_most_store_wait(tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts connections and never answers: the lookup gives up after store_wait, not after
    read_timeout x attempts."""
    import socket

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        port = server.getsockname()[1]
        s = _session(tmp_path, f"s3://bucket/p?endpoint=http://127.0.0.1:{port}", read_timeout=30, max_attempts=3, store_wait=1.0)
        with caplog.at_level(logging.WARNING, logger="castore.torch"):
            start = time.monotonic()
            assert s.get("fx-graph", "k") is None
            assert s.get("fx-graph", "k2") is None  # skipped: the breaker is open
            elapsed = time.monotonic() - start
        assert 1.0 <= elapsed < 3.0
        assert s.stats.caches["fx-graph"].get_errors == 1 and s.stats.caches["fx-graph"].skipped == 1
        assert sum(r.levelno >= logging.WARNING for r in caplog.records) == 1
    finally:
        server.close()
