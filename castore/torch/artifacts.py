"""Compiled C++ artifacts (kernel .so files, ISA probes, the precompiled header) served from the store.

PyTorch's FX cache entries hold the generated Python wrapper but not the C++ kernels it loads, so a fresh
machine rebuilds every kernel, the precompiled header and the ISA probes even on an FX hit. Three small
hooks close that gap (docs/dev/torch-internals.md has the measurements):

- ``codecache._worker_compile_cpp``: before building a kernel, fetch its final .so from the store into the
  exact path PyTorch will load; after building, upload it. The file name already hashes the source and the
  full compile command (ISA flags included), and castore's key adds the toolchain fingerprint.
- ``cpp_builder.CppBuilder.build``: the same for any other content-addressed build under the Inductor
  cache dir (the vector-ISA probes, one g++ run each on a fresh dir).
- ``codecache._precompile_header``: PyTorch preprocesses the header with g++ -E in every process just to
  hash it. castore names the header by (header, command line, compiler version, torch version) instead and
  builds or fetches the .gch only when a compile is about to happen (gcc ignores a missing .gch).

Every compiler invocation is counted (``compiler_runs``) so tests can prove a fresh machine compiles nothing.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
import threading
from types import ModuleType
from typing import Any

from castore.torch.import_hooks import Patches
from castore.torch.session import StoreSession

log = logging.getLogger("castore.torch")

_counts_lock = threading.Lock()
compiler_runs = 0  # compiler processes PyTorch started in this process since install()


def _count_compile() -> None:
    global compiler_runs
    with _counts_lock:
        compiler_runs += 1


@functools.cache
def toolchain_fingerprint() -> str:
    """What makes a built binary usable here besides its own name: torch, compiler, CPU arch, Python ABI."""
    import torch
    from torch._inductor import cpp_builder

    try:
        compiler = cpp_builder.get_cpp_compiler()
        compiler_info = cpp_builder.get_compiler_version_info(compiler)
    except Exception:  # noqa: BLE001 - no compiler: nothing will be built anyway
        compiler_info = "none"
    parts = (torch.__version__, compiler_info, platform.machine(), sys.implementation.cache_tag, sys.platform)
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _artifact_key(kind: str, path: str, root: str) -> str:
    rel = os.path.relpath(path, root).replace(os.sep, "_")
    return f"{kind}.{toolchain_fingerprint()}.{rel}"


def _fetch_into(session: StoreSession, cache: str, key: str, target: str) -> bool:
    data = session.get(cache, key)
    if data is None:
        return False
    try:
        from castore.fsutil import write_atomic

        write_atomic(target, data)
        os.chmod(target, 0o755)
        return True
    except OSError as exc:
        log.warning("castore: cannot write %s: %s", target, exc)
        return False


def _upload(session: StoreSession, cache: str, key: str, path: str) -> None:
    # Read by the background writer, when the compile pauses: a precompiled header is about 150 MB.
    session.put_file(cache, key, path, meta={"artifact": cache, "filename": os.path.basename(path)})


def _adopt_pch(built: str, target: str) -> bool:
    """Give the header PyTorch just built castore's name, the only one this process compiles against: a hard link,
    not a copy (about 150 MB on the compile's path, and on the disk twice). PyTorch's own name keeps it, so a process
    of this machine running without castore does not build it again. Where a link cannot be made, a rename, and a
    copy as a last resort. True when ``target`` holds a header (ours, or one another process of this machine named
    first); without one, the compiler reads the plain header and the build is slower, not wrong."""
    try:
        os.link(built, target)
        return True
    except FileExistsError:
        return True  # another process of this machine named it first (only ever a whole file: link, rename, copy)
    except FileNotFoundError:
        return os.path.exists(target)
    except OSError:  # a filesystem without hard links, or no rights
        pass
    try:
        os.replace(built, target)
        return True
    except FileNotFoundError:
        return os.path.exists(target)  # another process of this machine renamed it first
    except OSError:  # another filesystem: a copy
        try:
            from castore.fsutil import copy_atomic

            copy_atomic(built, target)
            return True
        except OSError as exc:
            log.warning("castore: cannot keep the precompiled header %s: %s", target, exc)
            return False


def install(session: StoreSession, patches: Patches) -> None:
    """Hook Inductor's C++ builds as its modules are imported (cpp_builder, then codecache, which imports it)."""
    in_kernel_build = threading.local()  # the generic build hook leaves kernel builds (and their .o) to the other

    def on_cpp_builder(cpp_builder: ModuleType) -> None:
        # 1. Count every compiler run.
        original_run = cpp_builder.run_compile_cmd

        def run_compile_cmd(cmd_line: str, cwd: str) -> None:
            _count_compile()
            return original_run(cmd_line, cwd)

        patches.replace(cpp_builder, "run_compile_cmd", run_compile_cmd)

        # 4. Any other build under the cache dir (vector-ISA probes).
        original_build = cpp_builder.CppBuilder.build

        def build(self: Any) -> Any:
            from torch._inductor.runtime.cache_dir_utils import cache_dir

            target = self.get_target_file_path()
            root = cache_dir()
            eligible = (
                not getattr(in_kernel_build, "active", False)
                and not getattr(self, "_preprocessing", False)
                and not getattr(self, "_precompiling", False)
                and os.path.abspath(target).startswith(root + os.sep)
            )
            if eligible and not os.path.exists(target):
                if _fetch_into(session, "cpp-build", _artifact_key("build", target, root), target):
                    return None
            result = original_build(self)
            if eligible and os.path.exists(target):
                _upload(session, "cpp-build", _artifact_key("build", target, root), target)
            return result

        patches.replace(cpp_builder.CppBuilder, "build", build)

    def on_codecache(codecache: ModuleType) -> None:
        pending: dict[str, tuple[str, str, dict[str, Any]]] = {}  # precompiled headers named but not built yet
        pch_lock = threading.Lock()

        # 2. The precompiled header, named without running the preprocessor, built or fetched on demand.
        original_pch = getattr(codecache, "_precompile_header", None)
        header_dir = getattr(codecache, "_HEADER_DIR", None)
        if original_pch is not None and header_dir is not None:
            build_pch = getattr(original_pch, "__wrapped__", original_pch)

            @functools.cache
            def lazy_precompile_header(header: str, hashable_cmd_line: str, **compile_command: Any) -> str:
                key_material = repr((header, hashable_cmd_line, sorted(map(str, compile_command.items())), toolchain_fingerprint()))
                name = "c" + hashlib.sha256(key_material.encode()).hexdigest()[:40] + ".h"
                path = os.path.join(header_dir, "castore", name)
                if not os.path.exists(path):
                    codecache.write_atomic(path, f"#include <{header}>\n", make_dirs=True)
                pending[path] = (header, hashable_cmd_line, compile_command)
                return path

            def ensure_pch(path: str) -> None:
                gch = path + ".gch"
                with pch_lock:
                    if os.path.exists(gch):
                        return
                    key = f"pch.{os.path.basename(gch)}"
                    if _fetch_into(session, "cpp-pch", key, gch):
                        return
                    header, cmd_line, kwargs = pending[path]
                    built = build_pch(header, cmd_line, **kwargs)  # PyTorch's own build (-E, hash, -x c++-header)
                    if _adopt_pch(built + ".gch", gch):
                        _upload(session, "cpp-pch", key, gch)

            patches.replace(codecache, "_precompile_header", lazy_precompile_header)
        else:

            def ensure_pch(path: str) -> None:
                return None

        def ensure_pch_for(builders: Any) -> None:
            for builder in builders:
                command = builder.get_command_line()
                for path in list(pending):
                    if path in command:
                        ensure_pch(path)

        # 3. Kernel .so files: fetch the final target before compiling, upload after.
        original_worker = getattr(codecache, "_worker_compile_cpp", None)
        if original_worker is not None:

            def worker_compile_cpp(lock_path: str, cpp_builders: Any) -> None:
                from torch._inductor.runtime.cache_dir_utils import cache_dir

                final = cpp_builders[-1].get_target_file_path()
                root = cache_dir()
                eligible = os.path.abspath(final).startswith(root + os.sep)
                if eligible and not os.path.exists(final):
                    key = _artifact_key("cpp", final, root)
                    if _fetch_into(session, "cpp-kernel", key, final):
                        return  # the linked .so is all PyTorch loads; the .o steps are skipped too
                if not os.path.exists(final):
                    ensure_pch_for(cpp_builders)
                existed = os.path.exists(final)
                in_kernel_build.active = True
                try:
                    original_worker(lock_path, cpp_builders)
                finally:
                    in_kernel_build.active = False
                if eligible and not existed and os.path.exists(final):
                    _upload(session, "cpp-kernel", _artifact_key("cpp", final, root), final)

            patches.replace(codecache, "_worker_compile_cpp", worker_compile_cpp)

    patches.on_import("torch._inductor.cpp_builder", on_cpp_builder)
    patches.on_import("torch._inductor.codecache", on_codecache)
