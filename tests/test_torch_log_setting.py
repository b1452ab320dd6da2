"""CASTORE_LOG (the ``log`` setting) and ``castore -v run`` turn castore's logging on in every process of a job."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from castore.config import load_config
from castore.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
# A job of two Python processes: the command castore runs, and a process it starts (as Inductor starts workers).
JOB = "import subprocess, sys, torch; subprocess.run([sys.executable, '-c', 'import torch'], check=True)"


def _run(tmp_path: Path, castore_args: list[str], env_extra: dict[str, str], job: str = JOB) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CASTORE_", "TORCHINDUCTOR_"))}
    env.update(PYTHONPATH=str(ROOT), CASTORE_URL=f"file://{tmp_path}/store", CASTORE_CACHE_DIR=str(tmp_path / "local"), **env_extra)
    return subprocess.run(
        [sys.executable, "-m", "castore", *castore_args, "run", "--", sys.executable, "-c", job],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )


def _pids_saying(stderr: str, text: str) -> set[str]:
    return {m.group(1) for line in stderr.splitlines() if text in line and (m := re.search(r"\[pid (\d+)\]", line))}


@pytest.mark.torch
def test_castore_log_turns_logging_on_in_every_process_of_a_job(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    proc = _run(tmp_path, [], {"CASTORE_LOG": "info"})
    assert proc.returncode == 0, proc.stderr
    assert len(_pids_saying(proc.stderr, "caches served from")) == 2, proc.stderr
    assert "DEBUG" not in proc.stderr

    quiet = _run(tmp_path, [], {}, job="import torch")
    assert quiet.returncode == 0, quiet.stderr
    assert "castore" not in quiet.stderr


@pytest.mark.torch
def test_verbose_run_logs_in_the_processes_it_starts(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    proc = _run(tmp_path, ["-v"], {}, job="import torch")
    assert proc.returncode == 0, proc.stderr
    assert len(_pids_saying(proc.stderr, "caches served from")) == 1, proc.stderr


def test_log_setting_values() -> None:
    assert load_config(env={"CASTORE_LOG": "DEBUG"}, cwd=Path("/")).log == "debug"
    assert load_config(env={"CASTORE_LOG": "warn"}, cwd=Path("/")).log == "warning"
    assert load_config(env={"CASTORE_LOG": "off"}, cwd=Path("/")).log == ""
    assert load_config(env={}, cwd=Path("/")).log == ""
    with pytest.raises(ConfigError, match="log level"):
        load_config(env={"CASTORE_LOG": "loud"}, cwd=Path("/"))
