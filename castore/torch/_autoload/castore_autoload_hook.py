"""A post-import hook: run castore.torch.install_from_environment() once ``torch`` has been imported.

A top-level module of the autoload folder, not part of the castore package, on purpose: every Python process
started under castore loads it, and most of them never import torch (Inductor's ISA probes, build helpers).
Importing castore there would cost each of them its start-up imports (70 ms; six probes per fresh process).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType


class _AfterTorchImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "torch":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding us
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)  # type: ignore[arg-type]
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original_exec = loader.exec_module  # type: ignore[attr-defined]

        def exec_module(module: ModuleType) -> None:
            original_exec(module)
            from castore.torch import install_from_environment

            install_from_environment()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install_after_torch_import() -> None:
    if "torch" in sys.modules:
        from castore.torch import install_from_environment

        install_from_environment()
    elif not any(isinstance(f, _AfterTorchImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTorchImport())
