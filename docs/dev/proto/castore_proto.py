"""castore prototype (torch 2.13 CPU): remote-cache backend + C++ .so / PCH interception.

NOT product code. Store = a directory: remote-cache KV in kv.pkl (a dict, pickled),
binary blobs (.so, .gch) as files named sha256(store_key).

Usage (in the process that calls torch.compile, BEFORE compiling):
    import castore_proto; castore_proto.install("/tmp/castore_store", so=True)
Env needed on every machine (they are part of the FX/AOT keys, keep them identical):
    TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE=1 TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE=1
"""
from __future__ import annotations

import functools
import hashlib
import os
import pickle
import shutil
import threading
import time

COUNTS = {"compile_cmd": 0, "pch_preprocess": 0, "so_fetch": 0, "so_put": 0,
          "pch_fetch": 0, "pch_put": 0, "kv_get_hit": 0, "kv_get_miss": 0, "kv_put": 0}
_LOCK = threading.Lock()
_STORE: str | None = None


# ---------------------------------------------------------------- KV backend
class DictPickleBackend:  # duck-types torch._inductor.remote_cache.RemoteCacheBackend
    """key: str like 'pt2:fx-graph-v1::<key>:c1'; data: bytes (JSON, ascii)."""

    def __init__(self) -> None:
        from torch._inductor.remote_cache import RemoteCacheBackend
        # make it a real subclass instance so get/put stats wrappers work
        self.__class__ = type("CastoreBackend", (DictPickleBackend, RemoteCacheBackend), {})
        RemoteCacheBackend.__init__(self)
        self.path = os.path.join(_STORE, "kv.pkl")

    def _load(self) -> dict:
        try:
            with open(self.path, "rb") as f:
                return pickle.load(f)
        except FileNotFoundError:
            return {}

    def _get(self, key: str):
        try:  # never raise: some call sites have no try/except
            v = self._load().get(key)
            COUNTS["kv_get_hit" if v is not None else "kv_get_miss"] += 1
            return v
        except Exception:
            return None

    def _put(self, key: str, data) -> None:
        try:
            with _LOCK:
                d = self._load()
                d[key] = data
                tmp = self.path + f".{os.getpid()}.tmp"
                with open(tmp, "wb") as f:
                    pickle.dump(d, f)
                os.replace(tmp, self.path)
            COUNTS["kv_put"] += 1
        except Exception:
            pass


# ---------------------------------------------------------------- blob store
def _blob(key: str) -> str:
    return os.path.join(_STORE, "blobs", hashlib.sha256(key.encode()).hexdigest())


def blob_get(key: str, dst: str) -> bool:
    src = _blob(key)
    if not os.path.exists(src):
        return False
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.castore.{os.getpid()}.{threading.get_ident()}.tmp"
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dst)  # atomic: torch checks os.path.exists(target)
    return True


def blob_put(key: str, src: str) -> None:
    dst = _blob(key)
    if os.path.exists(dst):
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.{os.getpid()}.tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# ---------------------------------------------------------------- counting
def install_counter() -> None:
    """Count every C++ compiler invocation Inductor makes (kernels, linking, PCH, -E)."""
    import torch._inductor.cpp_builder as cb
    if getattr(cb.run_compile_cmd, "_castore", False):
        return
    orig = cb.run_compile_cmd

    def run_compile_cmd(cmd_line: str, cwd: str) -> None:
        with _LOCK:
            COUNTS["compile_cmd"] += 1
        if os.environ.get("CASTORE_LOG_CMDS"):
            print("[castore] compile:", cmd_line[:160], flush=True)
        return orig(cmd_line, cwd)

    run_compile_cmd._castore = True
    cb.run_compile_cmd = run_compile_cmd  # CppBuilder.build looks it up as a module global


# ---------------------------------------------------------------- .so + PCH
def _so_key(path: str) -> str:
    # basename already hashes (source + full compile command incl. ISA flags); add torch version
    import torch
    return f"cpp-so/{torch.__version__}/{os.path.basename(path)}"


def install_so_interception() -> None:
    import torch
    import torch._inductor.codecache as cc

    orig_worker = cc._worker_compile_cpp
    orig_pch = cc._precompile_header.__wrapped__  # undo functools.cache

    # PCH: return a deterministic path immediately (no g++ -E, no openssl); build lazily.
    pending: dict[str, tuple] = {}

    @functools.cache
    def lazy_precompile_header(header: str, hashable_cmd_line: str, **compile_command):
        from torch._inductor.cpp_builder import get_compiler_version_info, CppTorchDeviceOptions
        opt = CppTorchDeviceOptions(**{k: v for k, v in compile_command.items() if k != "extra_flags"},
                                    precompiling=True)
        k = hashlib.sha256(repr((header, hashable_cmd_line, sorted(map(str, compile_command.items())),
                                 get_compiler_version_info(opt.get_compiler()),
                                 torch.__version__)).encode()).hexdigest()[:40]
        path = os.path.join(cc._HEADER_DIR, "castore", f"c{k}.h")
        if not os.path.exists(path):
            cc.write_atomic(path, f"#include <{header}>\n", make_dirs=True)
        pending[path] = (header, hashable_cmd_line, compile_command)
        return path

    def ensure_pch(path: str) -> None:
        gch = path + ".gch"
        if os.path.exists(gch):
            return
        if blob_get("pch/" + os.path.basename(gch), gch):
            COUNTS["pch_fetch"] += 1
            return
        header, cmd, kw = pending[path]
        real = orig_pch(header, cmd, **kw)  # real build (g++ -E + g++ -x c++-header)
        if os.path.exists(real + ".gch"):
            blob_get_tmp = gch + f".{os.getpid()}.tmp"
            shutil.copyfile(real + ".gch", blob_get_tmp)
            os.replace(blob_get_tmp, gch)
            blob_put("pch/" + os.path.basename(gch), gch)
            COUNTS["pch_put"] += 1

    def worker_compile_cpp(lock_path, cpp_builders):
        final = cpp_builders[-1].get_target_file_path()
        if not os.path.exists(final) and blob_get(_so_key(final), final):
            with _LOCK:
                COUNTS["so_fetch"] += 1
            return  # skip the .o steps too: only the linked .so is needed
        if os.path.exists(final):
            return orig_worker(lock_path, cpp_builders)  # no-op in torch
        for b in cpp_builders:  # about to compile: materialise any lazy PCH first
            for p in list(pending):
                if p in b.get_command_line():
                    ensure_pch(p)
        orig_worker(lock_path, cpp_builders)
        if os.path.exists(final):
            blob_put(_so_key(final), final)
            with _LOCK:
                COUNTS["so_put"] += 1

    # Generic fallback at CppBuilder.build: any other content-addressed build under
    # cache_dir() (e.g. the VecISA probes in cpu_vec_isa.VecISA.check_build, ~6 g++ runs
    # per fresh TORCHINDUCTOR_CACHE_DIR).
    import torch._inductor.cpp_builder as cb
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    orig_build = cb.CppBuilder.build

    def build(self):
        target = self.get_target_file_path()
        eligible = (not self._preprocessing and not self._precompiling
                    and os.path.abspath(target).startswith(cache_dir() + os.sep))
        key = "cpp-build/" + torch.__version__ + "/" + os.path.relpath(target, cache_dir())
        if eligible and not os.path.exists(target) and blob_get(key, target):
            with _LOCK:
                COUNTS["so_fetch"] += 1
            return
        orig_build(self)
        if eligible and os.path.exists(target):
            blob_put(key, target)
            with _LOCK:
                COUNTS["so_put"] += 1

    cb.CppBuilder.build = build
    cc._worker_compile_cpp = worker_compile_cpp  # looked up as a global in load_async
    cc._precompile_header = lazy_precompile_header


def install(store: str, so: bool = False, kv: bool = True) -> None:
    global _STORE
    _STORE = store
    os.makedirs(store, exist_ok=True)
    install_counter()
    if kv:
        from torch._inductor import remote_cache as rc
        for name in ("RemoteFxGraphCache", "RemoteAOTAutogradCache"):
            getattr(rc, name).backend_override_cls = DictPickleBackend
    if so:
        install_so_interception()
