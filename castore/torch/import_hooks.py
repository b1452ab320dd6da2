"""Patches applied to PyTorch's modules when PyTorch imports them, not before.

``castore.torch.install()`` runs in every Python process of a job that imports torch (under ``castore run`` and in
Inductor's compile workers, right after ``import torch``), and most of those processes never compile: data-loader
workers, tokenizer helpers, launchers. Importing Dynamo and Inductor there to patch them would cost each process
seconds of CPU (4.5 to 7 s on the GPU machine), and would move a compiling process's own imports ahead of its model
build. So install() only registers what to patch, and each patch is applied right after its module's first import
has finished, from then on exactly as if it had been applied by hand. A module already imported is patched at once.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

log = logging.getLogger("castore.torch")

Apply = Callable[[ModuleType], None]


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path``: for a watched name, asks the finders behind it for the spec and wraps the
    loader's ``exec_module`` to run the callbacks once the module has executed without error. It stays in place
    until then: a ``find_spec`` that is not followed by an import (``importlib.util.find_spec``, as libraries probe
    for optional packages) must not use the hook up. The autoload's hook on ``torch`` itself
    (``_autoload/castore_autoload_hook.py``) is a one-name twin kept free of castore imports: fix both alike."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list[Apply]] = {}
        self.lock = threading.RLock()
        self._searching = threading.local()

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.callbacks or getattr(self._searching, "name", None) == fullname:
            return None
        self._searching.name = fullname
        try:
            spec = self._spec_from_the_others(fullname, path, target)
        finally:
            self._searching.name = None
        loader = getattr(spec, "loader", None) if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original_exec = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original_exec(module)
            self.run(fullname, module)

        loader.exec_module = exec_module  # the loader object is this spec's own (one per find_spec)
        return spec

    def _spec_from_the_others(self, fullname: str, path: Any, target: ModuleType | None) -> importlib.machinery.ModuleSpec | None:
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None

    def run(self, name: str, module: ModuleType) -> None:
        with self.lock:
            callbacks = self.callbacks.pop(name, [])
        for apply in callbacks:
            _apply_quietly(name, apply, module)


_finder = _AfterImportFinder()


def _apply_quietly(name: str, apply: Apply, module: ModuleType) -> None:
    try:
        apply(module)
    except Exception as exc:  # noqa: BLE001 - a patch that does not fit this torch must not break its import
        log.warning("castore: could not patch %s: %r", name, exc)


def _take(name: str, apply: Apply) -> bool:
    """Remove ``apply`` from the callbacks pending for ``name``; False if it was not pending (it ran already)."""
    with _finder.lock:
        pending = _finder.callbacks.get(name, [])
        if apply not in pending:
            return False
        pending.remove(apply)
        if not pending:
            del _finder.callbacks[name]
        return True


def when_imported(name: str, apply: Apply) -> Callable[[], None]:
    """Run ``apply(module)`` once ``name`` has been imported: now if it has, else right after its import.
    Returns a function that cancels a pending call (a no-op once it has run)."""
    with _finder.lock:
        _finder.callbacks.setdefault(name, []).append(apply)
        if not sys.meta_path or sys.meta_path[0] is not _finder:
            if _finder in sys.meta_path:
                sys.meta_path.remove(_finder)
            sys.meta_path.insert(0, _finder)
    if name in sys.modules:
        # Imported already, or being imported: on another thread, whose spec may have been found before the
        # callback was registered (import_module waits for it to finish), or further up this thread's stack (the
        # module is still initialising, and the wrapped loader, if any, runs the callback when it is done).
        # Outside the lock: the other thread's wrapped loader takes it when the module is done.
        module = importlib.import_module(name)
        if not getattr(getattr(module, "__spec__", None), "_initializing", False) and _take(name, apply):
            _apply_quietly(name, apply, module)

    def cancel() -> None:
        _take(name, apply)

    return cancel


class Patches:
    """Attribute changes to modules, each made when its module is imported, all undone together (tests)."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self._cancel: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def on_import(self, module_name: str, apply: Apply) -> None:
        self._cancel.append(when_imported(module_name, apply))

    def replace(self, owner: Any, name: str, value: Any) -> Any:
        """``owner.name = value``, undone by undo(); returns the value it replaced. On a class, the class's own
        attribute (an inherited one is shadowed, and undo unshadows it); on a module or a config module, the
        attribute as read."""
        if isinstance(owner, type):
            existed = name in owner.__dict__
            original = owner.__dict__[name] if existed else getattr(owner, name, None)
        else:
            existed = hasattr(owner, name)
            original = getattr(owner, name, None)
        setattr(owner, name, value)

        def restore() -> None:
            if existed:
                setattr(owner, name, original)
            else:
                delattr(owner, name)

        with self._lock:
            self._undo.append(restore)
        return original

    def on_undo(self, restore: Callable[[], None]) -> None:
        """Run restore() in undo() (a change made other than by replace())."""
        with self._lock:
            self._undo.append(restore)

    def undo(self) -> None:
        for cancel in self._cancel:
            cancel()
        self._cancel.clear()
        with self._lock:
            undo, self._undo = self._undo, []
        for restore in reversed(undo):
            restore()
