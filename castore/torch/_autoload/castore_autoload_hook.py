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
    """Wraps the loader of ``torch`` to install castore once torch has executed. It leaves sys.meta_path only
    then: libraries probe for torch with importlib.util.find_spec("torch") long before they import it.

    castore.torch.import_hooks does the same for Inductor's modules; this twin stays separate because importing
    that module here would import the castore package in every process (see the module docstring). A fix to how
    one finds and wraps a spec belongs in both."""

    searching = False

    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "torch" or self.searching:
            return None
        spec = None
        self.searching = True  # the finders asked below may ask the whole meta path again
        try:
            for finder in list(sys.meta_path):
                if finder is not self and hasattr(finder, "find_spec"):
                    spec = finder.find_spec(fullname, path, target)
                    if spec is not None:
                        break
        finally:
            self.searching = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        original_exec = loader.exec_module  # type: ignore[attr-defined]

        def exec_module(module: ModuleType) -> None:
            original_exec(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            from castore.torch import install_from_environment

            install_from_environment()

        loader.exec_module = exec_module  # type: ignore[method-assign]  # this spec's own loader object
        return spec


def install_after_torch_import() -> None:
    if "torch" in sys.modules:
        from castore.torch import install_from_environment

        install_from_environment()
    elif not any(isinstance(f, _AfterTorchImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTorchImport())
