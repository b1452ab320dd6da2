"""`castore run` and `castore stats`: the no-code switch for fleets and the node's counters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from castore.cli import main

pytestmark = pytest.mark.torch


def test_run_installs_castore_in_the_child_without_code_changes(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CASTORE_", "TORCHINDUCTOR_"))}
    env["CASTORE_URL"] = f"file://{tmp_path}/store"
    env["CASTORE_CACHE_DIR"] = str(tmp_path / "local")
    probe = (
        "import json, torch, torch._inductor.config as c, castore.torch as ct;"
        "s = ct.active_session();"
        "print(json.dumps({'active': s is not None, 'url': s and s.config.url, 'fx_remote': c.fx_graph_remote_cache}))"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "castore", "run", "--", sys.executable, "-c", probe],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"active": True, "url": f"file://{tmp_path}/store", "fx_remote": True}


def test_run_of_a_missing_command_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--url", f"file://{tmp_path}/s", "run", "--", "no-such-command-castore"])
    assert result.exit_code == 2


def test_stats_sums_the_records_of_every_process(tmp_path: Path) -> None:
    stats_dir = tmp_path / "local" / "stats"
    stats_dir.mkdir(parents=True)
    for pid, hits in ((1, 2), (2, 3)):
        record = {
            "pid": pid,
            "caches": {"fx-graph": {"hits": hits, "misses": 1, "puts": 0, "bytes_read": 100 * hits, "seconds_saved": 1.5}},
            "layers": {"local": {"hits": hits}, "bucket": {"fetches": 1}},
        }
        (stats_dir / f"{pid}.json").write_text(json.dumps(record))
    result = CliRunner().invoke(main, ["--cache-dir", str(tmp_path / "local"), "stats", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["processes"] == 2
    assert data["caches"]["fx-graph"]["hits"] == 5 and data["caches"]["fx-graph"]["bytes_read"] == 500
    assert data["caches"]["fx-graph"]["seconds_saved"] == 3.0
    assert data["layers"] == {"local": {"hits": 5}, "bucket": {"fetches": 2}}
    text = CliRunner().invoke(main, ["--cache-dir", str(tmp_path / "local"), "stats"]).output
    assert "fx-graph" in text and "2 process(es)" in text
