"""`castore prewarm` and `castore pull` on file:// stores: exit codes, what they publish and write (no compile).

The workloads here stand in for a job's processes by appending to CASTORE_RECORD_DIR what castore.torch's session
records (castore/torch/recording.py), so the command's own logic is tested in seconds; tests/test_fleet_story.py
drives a real torch.compile workload.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from castore import bundles
from castore.backends.file import FileBackend
from castore.store import Store

ROOT = Path(__file__).resolve().parent.parent


def _castore(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("CASTORE_", "AWS_"))}
    full.update(PYTHONPATH=str(ROOT), XDG_CONFIG_HOME=str(tmp_path / "xdg"), CASTORE_CACHE_DIR=str(tmp_path / "cache"))
    full.update(env)
    return subprocess.run([sys.executable, "-m", "castore", *args], env=full, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def _recording_command(*entries: tuple[str, str], exit_code: int = 0) -> list[str]:
    lines = "".join(json.dumps(list(e)) + "\n" for e in entries)
    code = (
        "import os, sys; "
        f"open(os.path.join(os.environ['CASTORE_RECORD_DIR'], f'{{os.getpid()}}.entries'), 'a').write({lines!r}); "
        f"sys.exit({exit_code})"
    )
    return [sys.executable, "-c", code]


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    store = Store(FileBackend(str(tmp_path / "store")))
    store.put("torch-x", "fx-a", os.urandom(300_000))
    store.put("torch-x", "kernel-b", b"small")
    return f"file://{tmp_path}/store"


@pytest.mark.torch  # the fingerprint child imports torch
def test_prewarm_publishes_what_the_processes_recorded(store_url: str, tmp_path: Path) -> None:
    cmd = _recording_command(("torch-x", "fx-a"), ("torch-x", "kernel-b"))
    proc = _castore(["--url", store_url, "prewarm", "--name", "job", "--json", "--", *cmd], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["bundle"] == "job@1" and out["entries"] == 2 and out["published"]
    import torch

    assert out["fingerprint"]["torch"] == torch.__version__
    b = bundles.open_bundle(Store(FileBackend(str(tmp_path / "store"))), "job")
    assert b.entries == [("torch-x", "fx-a"), ("torch-x", "kernel-b")] and b.fingerprint["torch"] == torch.__version__

    again = _castore(["--url", store_url, "prewarm", "--name", "job", "--", *cmd], tmp_path)
    assert again.returncode == 0 and "up to date" in again.stdout, again.stdout + again.stderr


def test_prewarm_fails_naming_entries_that_were_not_published(store_url: str, tmp_path: Path) -> None:
    cmd = _recording_command(("torch-x", "fx-a"), ("torch-x", "lost-kernel"))
    proc = _castore(["--url", store_url, "prewarm", "--name", "job", "--settle", "0.5", "--", *cmd], tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "torch-x/lost-kernel" in proc.stderr and "1 of 2 entries" in proc.stderr
    assert bundles.versions(Store(FileBackend(str(tmp_path / "store"))), "job") == []


def test_prewarm_passes_on_the_commands_failure(store_url: str, tmp_path: Path) -> None:
    proc = _castore(["--url", store_url, "prewarm", "--name", "job", "--", *_recording_command(("torch-x", "fx-a"), exit_code=7)], tmp_path)
    assert proc.returncode == 7 and "no bundle published" in proc.stderr
    ro = _castore(["--url", store_url, "--read-only", "prewarm", "--name", "job", "--", "true"], tmp_path)
    assert ro.returncode == 2 and "read_only" in ro.stderr


def test_pull_writes_a_store_and_an_env_sh_that_points_at_it(store_url: str, tmp_path: Path) -> None:
    source = Store(FileBackend(str(tmp_path / "store")))
    bundles.publish(source, "job", [("torch-x", "fx-a"), ("torch-x", "kernel-b")], {"torch": "t"})
    target = tmp_path / "opt" / "castore"
    proc = _castore(["--url", store_url, "pull", "job", "--into", str(target)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "pulled bundle job@1" in proc.stdout
    shown = subprocess.run(["sh", "-c", f". {target}/env.sh && env"], capture_output=True, text=True, env={"PATH": os.environ["PATH"], "PYTHONPATH": "/elsewhere"})
    env = dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)
    assert env["CASTORE_URL"] == f"file://{target}/store" and env["CASTORE_READ_ONLY"] == "1"
    assert env["CASTORE_NAMESPACE"] == "torch-x" and env["CASTORE_TORCH_AUTOINSTALL"] == "1"
    assert env["PYTHONPATH"].endswith(":/elsewhere"), "env.sh keeps the caller's PYTHONPATH"
    assert "CASTORE_CACHE_DIR" not in env, "the node's own cache directory is not the puller's"
    pulled = Store(FileBackend(str(target / "store")), read_only=True)
    assert pulled.get("torch-x", "fx-a") == source.get("torch-x", "fx-a")
    assert json.loads((target / "bundle.json").read_text())["bundle"] == "job@1"

    missing = _castore(["--url", store_url, "pull", "nope", "--into", str(tmp_path / "x")], tmp_path)
    assert missing.returncode == 1 and "no bundle named 'nope'" in missing.stderr


@pytest.mark.torch
@pytest.mark.slow
def test_prewarm_records_the_entries_compile_workers_wrote(tmp_path: Path) -> None:
    """Entries put from inside Inductor's compile worker (a process the job's Python starts) are in the bundle."""
    scripts = ROOT / "tests" / "scripts"
    store_url = f"file://{tmp_path}/store"
    (tmp_path / "tmp").mkdir()
    proc = _castore(
        # torch first: under castore's autoload, a script calling castore.torch.install() before importing torch
        # would deadlock on install()'s lock (the import re-enters it).
        ["--url", store_url, "prewarm", "--name", "workers", "--json", "--", sys.executable, "-c",
         "import sys, torch, worker_autotune; sys.argv[1:] = ['3']; worker_autotune.main()"],
        tmp_path,
        PYTHONPATH=os.pathsep.join([str(scripts), str(ROOT)]),
        TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
        TMPDIR=str(tmp_path / "tmp"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])
    assert result["pid"] != result["parent_pid"] and result["castore_active"]
    b = bundles.open_bundle(Store(FileBackend(str(tmp_path / "store"))), "workers")
    assert len([key for _, key in b.entries if "castore-worker-test" in key]) == 3, b.entries
