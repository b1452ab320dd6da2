"""`castore demo` as a new user meets it: without torch, with a fleet's store configured, and what it leaves behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from castore.cli.torch_cmds import demo_overrides
from test_bench_command import block_import_env


def _demo_env(tmp_path: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """A user's environment with a fleet's store configured, and a TMPDIR of its own to see what is left in it."""
    env = {k: v for k, v in (base or os.environ).items() if not k.startswith(("CASTORE_", "TORCHINDUCTOR_"))}
    env["CASTORE_URL"] = f"file://{tmp_path}/fleet"
    env["CASTORE_CACHE_DIR"] = str(tmp_path / "local")
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return env


def test_demo_without_torch_says_how_to_install_it_in_one_line(tmp_path: Path) -> None:
    env = _demo_env(tmp_path, block_import_env(tmp_path, "torch"))
    proc = subprocess.run([sys.executable, "-m", "castore", "demo"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("castore: error:") and "pip install torch" in lines[0]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_demo_uses_a_store_only_when_given_url(tmp_path: Path) -> None:
    work = str(tmp_path / "work")
    scratch = demo_overrides({"url": None, "cache_dir": None, "read_only": None}, None, work)
    assert scratch["url"] == f"file://{work}/store" and scratch["read_only"] is False
    assert demo_overrides({"url": "s3://fleet/torch"}, None, work)["url"] == "s3://fleet/torch"  # castore --url … demo
    assert demo_overrides({"url": None}, "file:///mine", work)["url"] == "file:///mine"  # castore demo --url …
    assert "read_only" not in demo_overrides({}, "file:///mine", work)


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.timeout(600)
def test_demo_leaves_the_configured_store_and_the_disk_as_it_found_them(tmp_path: Path) -> None:
    """With CASTORE_URL naming a fleet's store and no --url: the demo runs on its own temporary store, writes
    nothing into the fleet's, and removes its temporary directory."""
    pytest.importorskip("torch")
    env = _demo_env(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "castore", "demo", "--model", "mlp", "--mode", "infer"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fresh machine via castore" in proc.stdout
    assert f"store: file://{tmp_path}/tmp/castore-demo-" in proc.stdout
    assert not (tmp_path / "fleet").exists()
    assert [p.name for p in (tmp_path / "tmp").iterdir()] == []
