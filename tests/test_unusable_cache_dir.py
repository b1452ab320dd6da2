"""An unusable cache_dir costs the node-local layer only, with one warning that names the setting and its source."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

import castore
from castore.config import load_config
from castore.torch.session import StoreSession

pytestmark = pytest.mark.s3


def _unusable(kind: str, tmp_path: Path) -> Path:
    if kind == "a-file":
        path = tmp_path / "cache-file"
        path.write_text("not a directory")
        return path
    if kind == "under-a-file":
        (tmp_path / "plain-file").write_text("x")
        return tmp_path / "plain-file" / "cache"
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only directory")
    path = tmp_path / "read-only"
    path.mkdir(mode=0o555)
    return path


@pytest.mark.parametrize("kind", ["a-file", "under-a-file", "read-only"])
def test_an_unusable_cache_dir_costs_only_the_local_layer(
    kind: str, s3_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(castore, "_cache_dir_reported", threading.Event())  # once per process: a fresh process here
    cache_dir = _unusable(kind, tmp_path)
    config = load_config(env={"CASTORE_URL": s3_url, "CASTORE_CACHE_DIR": str(cache_dir)}, cwd=tmp_path)
    with caplog.at_level(logging.WARNING, logger="castore"):
        session = StoreSession(config, "torch-test")
        session.put("fx-graph", "pt2:fx-graph-v1::fabc:c1", b"graph" * 50_000)
        assert session.flush(60)
        assert session.get("fx-graph", "pt2:fx-graph-v1::fabc:c1") == b"graph" * 50_000
        assert session.get("fx-graph", "pt2:fx-graph-v1::other:c1") is None
        session.close()  # records stats under cache_dir: no second warning
    counters = session.stats.caches["fx-graph"]
    assert (counters.puts, counters.hits, counters.misses, counters.get_errors, counters.put_errors) == (1, 1, 1, 0, 0)
    assert session.store.local is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "cache_dir" in warnings[0] and str(cache_dir) in warnings[0] and "CASTORE_CACHE_DIR" in warnings[0], warnings
