"""PyTorch's and Triton's source keys, remembered on this machine.

Before its first cache lookup every process computes Inductor's ``torch_key()`` (a SHA-256 over every module file of
torch: 0.14 s on the H200 host) and Triton's ``triton_key()`` (over its compiler's sources and its 400 MB
``libtriton.so``: 0.39 s, 2.2 s when the file is not in the page cache). Both change only when those files do.

castore keeps each value in the local cache folder under a name derived from a stat fingerprint of the files the
function reads (path, size, modification and change times, inode of each). A process whose fingerprint names a
stored value uses it; one that finds none computes the value with PyTorch's or Triton's own function and stores
it. triton_key is then computed on a thread of its own as soon as Triton is imported, when its walk would import
nothing: hashing the library releases the interpreter lock, so a fresh machine's main thread goes on with its
imports and model build meanwhile. torch_key is not: its walk reads 2,300 small files in Python, holding the
interpreter lock; on a thread beside the main thread's imports it took 0.9 to 1.4 s instead of 0.1 s on an H200
host and shortened no start (benchmarks/results/gpu-h200/aot-current/). Rewriting a file in place changes its
change time, so an edit of torch or Triton, an upgrade or a reinstall computes the key again. The folder belongs
to the node: whoever can write it can already write the compiled code PyTorch imports from its own caches.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import logging
import os
import pkgutil
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from castore.fsutil import write_atomic
from castore.torch.import_hooks import Patches

log = logging.getLogger("castore.torch")

BACKGROUND_WAIT = 10.0  # the longest a first call waits for the thread computing its key (a cold page cache: 2.2 s)
MAX_VALUE_BYTES = 1 << 20  # a key is a digest or a list of them; anything larger is not one of ours
_SUFFIXES = tuple(importlib.machinery.all_suffixes())
# Inductor's torch_key() hashes these next to torch's modules (codecache.torch_key, extra_files).
_TORCH_EXTRA_FILES = ("_inductor/codegen/aoti_runtime/interface.cpp", "_inductor/script.ld")
# Where Triton defines triton_key: triton.runtime.cache since 3.4, triton.compiler.compiler before.
TRITON_KEY_MODULES = ("triton.runtime.cache", "triton.compiler.compiler")
_TRITON_WALKED = ("compiler", "backends", "language")  # the folders triton_key walks with pkgutil.walk_packages


class KeyMemo:
    """Values by name and fingerprint, one small file each: ``<folder>/<name>-<fingerprint>``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def _path(self, name: str, fingerprint: str) -> str:
        return os.path.join(self.folder, f"{name}-{fingerprint}")

    def holds(self, name: str) -> bool:
        """Whether any value of this key is stored (a fresh machine's folder is empty or absent)."""
        try:
            return any(entry.startswith(name + "-") for entry in os.listdir(self.folder))
        except OSError:
            return False

    def get(self, name: str, fingerprint: str) -> bytes | None:
        try:
            with open(self._path(name, fingerprint), "rb") as f:
                value = f.read(MAX_VALUE_BYTES + 1)
        except OSError:
            return None
        return value if 0 < len(value) <= MAX_VALUE_BYTES else None

    def put(self, name: str, fingerprint: str, value: bytes) -> None:
        if not 0 < len(value) <= MAX_VALUE_BYTES:
            return
        try:
            write_atomic(self._path(name, fingerprint), value)  # creates the folder
        except OSError as exc:  # a read-only or full disk: the next process computes the key again
            log.debug("castore: could not store %s: %s", name, exc)


def fingerprint(label: str, root: str, paths: Iterator[str]) -> str:
    """A digest of each file's path under root, size, modification and change times and inode, in path order."""
    h = hashlib.sha256(f"{label}\0{os.path.realpath(root)}\0".encode())
    for path in sorted(paths):
        try:
            st = os.stat(path)
        except OSError:
            h.update(f"{os.path.relpath(path, root)}\0missing\n".encode())
            continue
        h.update(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n".encode())
    return h.hexdigest()[:40]


def package_module_files(root: str) -> Iterator[str]:
    """Every module file pkgutil.iter_modules finds under root, recursively through packages (what Inductor's
    build_code_hash reads), plus each package's __init__: files with an import suffix, folders holding an
    __init__ module. Bytecode caches are not modules."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for entry in entries:
        if entry.name == "__pycache__":
            continue
        if entry.is_dir(follow_symlinks=True):
            if any(os.path.isfile(os.path.join(entry.path, "__init__" + s)) for s in _SUFFIXES):
                yield from package_module_files(entry.path)
        elif entry.name.endswith(_SUFFIXES):
            yield entry.path


def all_files(root: str) -> Iterator[str]:
    """Every file under root but bytecode caches (Triton's key reads modules of several folders and its library)."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            yield os.path.join(folder, name)


class RememberedKey:
    """Stands in for a zero-argument cached key function: the stored value, or the original's, computed on the
    first call (or on a thread, compute_in_background) and then stored. Keeps the cache API callers use: ``set``
    (a compile worker is handed its parent's torch_key), ``clear``/``cache_clear``, ``prefetch``. The original runs
    outside any lock of this object, and a forked child starts with fresh locks and without its parent's thread."""

    def __init__(self, original: Callable[[], Any], name: str, encode: Callable[[Any], bytes], store: Callable[[bytes], None],
                 value: Any = None, report: dict[str, str] | None = None) -> None:
        self.__wrapped__ = original
        self.__name__ = getattr(original, "__name__", name)
        self.__doc__ = getattr(original, "__doc__", None)
        self._encode = encode
        self._store = store
        self._value = value
        self._lock = threading.Lock()
        self._background: tuple[int, threading.Event] | None = None  # (pid, set when the thread is done)
        self._report = report if report is not None else {}
        self._key_name = name
        if value is not None:
            self._report[name] = "stored"
        _INSTANCES.add(self)

    def __call__(self) -> Any:
        if self._value is not None:
            return self._value
        background = self._background
        if background is not None and background[0] == os.getpid():
            background[1].wait(BACKGROUND_WAIT)
            if self._value is not None:
                return self._value
        self._publish(self.__wrapped__(), "computed")
        return self._value

    def _publish(self, value: Any, how: str) -> None:
        """The first value published wins; it is stored once, outside the lock."""
        with self._lock:
            if self._value is not None or value is None:
                return
            self._value = value
            self._report[self._key_name] = how
        try:
            self._store(self._encode(value))
        except Exception as exc:  # noqa: BLE001 - the key is computed; keeping it is only a saving
            log.debug("castore: could not keep %s: %r", self.__name__, exc)

    @property
    def known(self) -> bool:
        return self._value is not None

    def compute_in_background(self) -> None:
        """Start the original on a thread of its own; the first call waits for it (at most BACKGROUND_WAIT, then
        computes the key itself). The caller makes sure the original imports nothing there (import locks)."""

        def run() -> None:
            try:
                self._publish(self.__wrapped__(), "thread")
            except Exception as exc:  # noqa: BLE001 - the caller's own call computes it then
                log.debug("castore: %s on a thread failed: %r", self.__name__, exc)
            finally:
                done.set()

        done = threading.Event()
        self._background = (os.getpid(), done)
        threading.Thread(target=run, name="castore-source-key", daemon=True).start()

    def set(self, value: Any) -> None:
        with self._lock:
            self._value = value
            self._report[self._key_name] = "set"

    def clear(self) -> None:
        with self._lock:
            self._value = None
        for name in ("clear", "cache_clear"):
            if callable(getattr(self.__wrapped__, name, None)):
                getattr(self.__wrapped__, name)()

    cache_clear = clear

    def prefetch(self) -> None:
        """Nothing to start: a stored value is at hand, and computing it early would race the caller's imports."""

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # the parent's may have been held by a thread the child does not have


_INSTANCES: weakref.WeakSet[RememberedKey] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for key in list(_INSTANCES):
        key._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _replace_everywhere(patches: Patches, name: str, original: Any, replacement: Any) -> int:
    """Point every imported module's ``name`` that is ``original`` (``from x import name`` copies) at replacement."""
    count = 0
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict) and namespace.get(name) is original:
            patches.replace(module, name, replacement)
            count += 1
    return count


class _Fingerprint:
    """A fingerprint taken on the caller's thread, or, on a machine that has stored no value of this key yet (the
    lookup cannot hit), on a thread of its own: a fresh machine does not wait for the walk."""

    def __init__(self, compute: Callable[[], str], background: bool) -> None:
        self._compute = compute
        self._value = ""
        self._done = threading.Event()
        self._pid = os.getpid()
        if background:
            threading.Thread(target=self._run, name="castore-source-key", daemon=True).start()
        else:
            self._run()

    def _run(self) -> None:
        try:
            self._value = self._compute()
        except Exception as exc:  # noqa: BLE001 - no fingerprint: nothing is looked up or stored
            log.debug("castore: fingerprint failed: %r", exc)
        finally:
            self._done.set()

    def get(self) -> str:
        if not self._done.is_set() and os.getpid() != self._pid:
            return ""  # forked before the parent's thread was done: that thread is not in this process
        self._done.wait()
        return self._value


def _remember(patches: Patches, memo: KeyMemo, module: ModuleType, name: str, fingerprint_of: Callable[[], str],
              encode: Callable[[Any], bytes], decode: Callable[[bytes], Any],
              report: dict[str, str] | None = None) -> RememberedKey | None:
    original = module.__dict__.get(name)
    if original is None or isinstance(original, RememberedKey) or not callable(original):
        return None
    holds = memo.holds(name)
    taken = _Fingerprint(fingerprint_of, background=not holds)
    stored = memo.get(name, taken.get()) if holds and taken.get() else None
    try:
        value = decode(stored) if stored is not None else None
    except ValueError:
        value = None

    def store(data: bytes) -> None:
        if taken.get():
            memo.put(name, taken.get(), data)

    replacement = RememberedKey(original, name, encode, store, value, report)
    _replace_everywhere(patches, name, original, replacement)
    log.debug("castore: %s %s", name, "remembered" if value is not None else "computed on first use, then kept")
    return replacement


def _torch_key_files(torch_root: str) -> Iterator[str]:
    yield from package_module_files(torch_root)
    for rel in _TORCH_EXTRA_FILES:
        yield os.path.join(torch_root, rel)


def _packages(path: str, prefix: str) -> Iterator[str]:
    """The packages pkgutil.walk_packages([path], prefix) imports, found without importing them."""
    for info in pkgutil.iter_modules([path], prefix):
        if info.ispkg:
            yield info.name
            yield from _packages(os.path.join(path, info.name.rsplit(".", 1)[-1]), info.name + ".")


def walk_imports_nothing(root: str, package: str = "triton") -> bool:
    """Whether triton_key's walk over its folders would import nothing: every package it visits is imported and
    initialised already. Only then may it run on a thread of its own (an import there could take a module lock
    the caller's thread waits on)."""
    for folder in _TRITON_WALKED:
        for name in _packages(os.path.join(root, folder), f"{package}.{folder}."):
            module = sys.modules.get(name)
            if module is None or getattr(getattr(module, "__spec__", None), "_initializing", False):
                return False
    return True


class _TritonKey:
    """triton_key remembered where Triton defines it; when no value is stored for these files, computed on a
    thread once Triton's import is done, beside the process's other imports and its model build."""

    def __init__(self, patches: Patches, memo: KeyMemo, report: dict[str, str]) -> None:
        self.patches, self.memo, self.report = patches, memo, report
        self.remembered: RememberedKey | None = None

    def defined(self, module: ModuleType) -> None:
        original = module.__dict__.get("triton_key")
        if original is None or getattr(original, "__module__", None) != module.__name__:
            return  # only where it is defined: the other name is an alias, reached by _replace_everywhere
        root = os.path.dirname(os.path.dirname(os.path.abspath(module.__file__ or "")))
        version = getattr(sys.modules.get("triton"), "__version__", "")

        def print_() -> str:
            return fingerprint(f"triton_key {version}", root, all_files(root))

        self.remembered = _remember(self.patches, self.memo, module, "triton_key", print_,
                                    lambda v: str(v).encode(), lambda b: b.decode(), self.report)
        self.start()

    def start(self, _module: ModuleType | None = None) -> None:
        triton = sys.modules.get("triton")
        remembered = self.remembered
        if remembered is None or remembered.known or triton is None or not getattr(triton, "__file__", None):
            return
        if getattr(getattr(triton, "__spec__", None), "_initializing", False):
            return  # the hook on triton itself starts it when its import is done
        if walk_imports_nothing(os.path.dirname(os.path.abspath(triton.__file__))):
            remembered.compute_in_background()


def install(patches: Patches, folder: str, report: dict[str, str] | None = None) -> None:
    """Remember torch_key when Inductor's codecache is imported, and triton_key when Triton defines it; ``report``
    gets how each key was had (stored, thread, computed, set)."""
    memo = KeyMemo(folder)
    report = report if report is not None else {}

    def torch_key(codecache: ModuleType) -> None:
        import torch

        root = os.path.dirname(os.path.abspath(torch.__file__))

        def print_() -> str:
            return fingerprint("torch_key " + torch.__version__, root, _torch_key_files(root))

        _remember(patches, memo, codecache, "torch_key", print_, bytes, bytes, report)

    triton_key = _TritonKey(patches, memo, report)
    patches.on_import("torch._inductor.codecache", torch_key)
    for name in TRITON_KEY_MODULES:
        patches.on_import(name, triton_key.defined)
    patches.on_import("triton", triton_key.start)


__all__ = ["KeyMemo", "RememberedKey", "all_files", "fingerprint", "install", "package_module_files", "walk_imports_nothing"]
