"""castore doctor and castore pull name a Python whose compiler packages have no bytecode (every process compiles
their sources again where none may be written, the first process of each fresh container otherwise), with the command
that fixes it; packages with their bytecode get no advice."""

from __future__ import annotations

import compileall
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from castore.torch import bytecode


def _package(root: Path, n: int = 4) -> Path:
    pkg = root / "fakecompiler"
    (pkg / "_inductor").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for i in range(n):
        (pkg / "_inductor" / f"mod{i}.py").write_text(f"VALUE = {i}\n")
    return pkg


def test_no_bytecode_and_no_writing_is_named_with_the_fix(tmp_path: Path) -> None:
    pkg = _package(tmp_path)
    state = bytecode.check(str(pkg), ("_inductor",), package="fakecompiler", dont_write=True)
    assert (state.modules, state.cached, state.writable) == (4, 0, False)
    assert state.recompiles_every_process
    [line] = bytecode.advice([state])
    assert "fakecompiler (0 of 4 modules" in line
    assert f"-m compileall -q {pkg}" in line


def test_compiled_bytecode_needs_no_advice(tmp_path: Path) -> None:
    pkg = _package(tmp_path)
    assert compileall.compile_dir(str(pkg), quiet=1)
    state = bytecode.check(str(pkg), ("_inductor",), package="fakecompiler", dont_write=True)
    assert (state.modules, state.cached) == (4, 4)
    assert not state.recompiles_every_process
    assert bytecode.advice([state]) == []


def test_an_image_without_bytecode_costs_each_fresh_container_once_where_python_may_write_it(tmp_path: Path) -> None:
    pkg = _package(tmp_path)
    state = bytecode.check(str(pkg), ("_inductor",), package="fakecompiler", dont_write=False)
    assert state.writable and state.missing and not state.recompiles_every_process
    [line] = bytecode.advice([state])
    assert "the first process of every fresh machine or container" in line
    assert f"-m compileall -q {pkg}" in line


def test_the_installed_packages_are_found_without_importing_them() -> None:
    pytest.importorskip("torch")
    had_torch = "torch" in sys.modules
    states = {s.package: s for s in bytecode.compiler_bytecode()}
    assert states["torch"].modules > 50  # torch/_dynamo and torch/_inductor
    assert ("torch" in sys.modules) == had_torch


@pytest.mark.torch
@pytest.mark.s3
def test_doctor_prints_the_bytecode_advice(s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    from click.testing import CliRunner

    from castore.cli import main

    pkg = _package(tmp_path)
    stale = bytecode.check(str(pkg), ("_inductor",), package="fakecompiler", dont_write=True)
    monkeypatch.setattr(bytecode, "compiler_bytecode", lambda: [stale])
    result = CliRunner().invoke(main, ["--url", s3_url, "--cache-dir", str(tmp_path / "layer"), "doctor"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Python bytecode: fakecompiler (0 of 4 modules" in result.output
    assert "compileall" in result.output


def test_pull_names_an_image_without_bytecode(tmp_path: Path) -> None:
    """`castore pull`, a step of an image build, says so on stderr (and in --json), and still succeeds."""
    from castore import bundles
    from castore.backends.file import FileBackend
    from castore.store import Store

    fake = tmp_path / "site"
    for sub in ("_dynamo", "_inductor"):
        (fake / "torch" / sub).mkdir(parents=True)
        for i in range(3):
            (fake / "torch" / sub / f"m{i}.py").write_text("X = 1\n")
    (fake / "torch" / "__init__.py").write_text("")
    source = Store(FileBackend(str(tmp_path / "store")))
    source.put("torch-x", "fx-a", b"an entry")
    bundles.publish(source, "job", [("torch-x", "fx-a")], {"torch": "t"})
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CASTORE_", "AWS_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(fake), str(root)]), PYTHONDONTWRITEBYTECODE="1",
               XDG_CONFIG_HOME=str(tmp_path / "xdg"), CASTORE_CACHE_DIR=str(tmp_path / "cache"))
    argv = [sys.executable, "-m", "castore", "--url", f"file://{tmp_path}/store", "pull", "job", "--into", str(tmp_path / "out")]
    proc = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Python bytecode: torch (0 of 6 modules checked have bytecode)" in proc.stderr
    assert "every process compiles" in proc.stderr
    assert f"-m compileall -q {fake / 'torch'}" in proc.stderr
    assert "pulled bundle job@1" in proc.stdout

    assert compileall.compile_dir(str(fake), quiet=1)
    proc = subprocess.run(argv + ["--json"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Python bytecode" not in proc.stderr
    assert json.loads(proc.stdout)["bytecode_advice"] == []
