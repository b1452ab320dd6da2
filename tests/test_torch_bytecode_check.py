"""castore doctor names a Python that compiles the compiler's sources again in every process (no bytecode cache, and
none may be written), with the command that fixes it; a Python that has or may write the bytecode gets no advice."""

from __future__ import annotations

import compileall
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


def test_a_python_that_writes_its_bytecode_needs_no_advice(tmp_path: Path) -> None:
    pkg = _package(tmp_path)
    state = bytecode.check(str(pkg), ("_inductor",), package="fakecompiler", dont_write=False)
    assert state.writable and not state.recompiles_every_process


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
