"""A script that calls castore.torch.install() before importing torch, under `castore run` (whose autoload
installs right after torch's import): one session, no deadlock on install's lock."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.torch

SCRIPT = """
import castore.torch
session = castore.torch.install()
import torch
assert castore.torch.active_session() is session
print("one session:", session.namespace)
"""


def test_install_before_torch_import_under_castore_run(tmp_path) -> None:  # noqa: ANN001
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASTORE_")}
    env.update(CASTORE_URL=f"file://{tmp_path / 'store'}", CASTORE_CACHE_DIR=str(tmp_path / "local"), XDG_CONFIG_HOME=str(tmp_path))
    castore = os.path.join(os.path.dirname(sys.executable), "castore")
    done = subprocess.run([castore, "run", "--", sys.executable, "-c", SCRIPT], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "one session: torch-" in done.stdout
