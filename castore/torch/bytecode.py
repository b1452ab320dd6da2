"""Whether this machine's Python keeps the bytecode of the compiler's modules, or compiles their sources in every
process.

A fresh process that compiles imports Dynamo, Inductor and Triton: hundreds of modules. An image built with
``pip install --no-compile`` (or stripped of ``__pycache__``) and run with ``PYTHONDONTWRITEBYTECODE=1`` (a common
container setting) has no bytecode for them and may not write any, so every process compiles those sources again:
on an H200 machine, importing Dynamo and Inductor took 10.1 to 10.6 s that way against 4.6 to 5.7 s with the
bytecode compiled once (benchmarks/results/gpu-h200/bytecode-cached/); where bytecode may be written, the first
process of every fresh container still pays it. No cache of compiled artifacts saves that: ``castore doctor`` and
``castore pull`` (a step of an image build) name it, with the command that fixes it when the image is built.

Reads file names only: torch is not imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass

# The packages a compiling process imports most of; (package, sub-folders whose modules are checked).
COMPILER_PACKAGES = (("torch", ("_dynamo", "_inductor")), ("triton", ("",)))


@dataclass(frozen=True)
class BytecodeState:
    package: str
    directory: str
    modules: int  # source files checked
    cached: int  # of those, with a bytecode file where this interpreter looks for it
    writable: bool  # this process would write the missing ones (so the next process has them)

    @property
    def missing(self) -> bool:
        """Most of the checked modules have no bytecode: a fresh machine's processes compile their sources."""
        return self.modules > 0 and self.cached < self.modules // 2

    @property
    def recompiles_every_process(self) -> bool:
        return self.missing and not self.writable


def package_dir(name: str) -> str | None:
    """Where a package is installed, without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return locations[0] if locations else None


def check(directory: str, subdirs: tuple[str, ...] = ("",), *, package: str = "", dont_write: bool | None = None) -> BytecodeState:
    """Count the modules under ``directory``'s sub-folders (one level) that have a bytecode file."""
    modules = cached = 0
    for sub in subdirs:
        folder = os.path.join(directory, sub) if sub else directory
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            if not name.endswith(".py"):
                continue
            modules += 1
            try:
                if os.path.exists(importlib.util.cache_from_source(os.path.join(folder, name))):
                    cached += 1
            except (NotImplementedError, ValueError):  # an interpreter without bytecode caching
                return BytecodeState(package, directory, 0, 0, True)
    if dont_write is None:
        dont_write = sys.dont_write_bytecode
    target = sys.pycache_prefix or directory
    writable = not dont_write and os.access(target if os.path.isdir(target) else os.path.dirname(target) or ".", os.W_OK)
    return BytecodeState(package, directory, modules, cached, writable)


def compiler_bytecode() -> list[BytecodeState]:
    """The state of each compiler package installed here."""
    states = []
    for package, subdirs in COMPILER_PACKAGES:
        directory = package_dir(package)
        if directory is not None:
            states.append(check(directory, subdirs, package=package))
    return states


def advice(states: list[BytecodeState]) -> list[str]:
    """One line naming the packages whose sources a fresh machine's processes compile again, with the fix; none when
    all is well. Without bytecode in the image, a process that may write it still pays once per fresh container."""
    missing = [s for s in states if s.missing]
    if not missing:
        return []
    what = ", ".join(f"{s.package} ({s.cached} of {s.modules} modules checked have bytecode)" for s in missing)
    dirs = " ".join(s.directory for s in missing)
    if any(s.recompiles_every_process for s in missing):
        who = ("and this process may not write it (PYTHONDONTWRITEBYTECODE, python -B, or a read-only install): "
               "every process compiles the compiler's sources again")
    else:
        who = "so the first process of every fresh machine or container compiles the compiler's sources again"
    return [f"Python bytecode: {what}, {who}, seconds before its first compile. "
            f"Compile them when the image is built: {sys.executable} -m compileall -q {dirs}"]


__all__ = ["BytecodeState", "advice", "check", "compiler_bytecode", "package_dir"]
