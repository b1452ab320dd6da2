"""Triton's own compile cache, read through from the store.

Inductor bundles the Triton kernels of a graph into its FX cache entry, so an FX hit loads them without
compiling. Two kinds of Triton compile are outside any bundle and run again on a fresh machine:

- kernels compiled *after* the graph's entry was written: the configurations that coordinate-descent tuning
  and ``_dynamic_scale_rblock`` settle on, which a warm start compiles once more from the autotune winner;
- Triton's own C launchers (``cuda_utils``, ``__triton_launcher``): a C compiler run per process on an empty
  ``TRITON_CACHE_DIR``.

``CastoreTritonCacheManager`` is a Triton ``CacheManager`` (selected with ``TRITON_CACHE_MANAGER``, which
``castore.torch.install()`` exports so compile workers use it too). It keeps Triton's file cache as it is and
adds one step on a local miss: fetch the compiled group (or launcher) from the store, write it into the cache
dir, and let Triton load it. Every group Triton writes is uploaded in the background. The key is Triton's own
cache key (a hash of the source, the target, the options and Triton's version) plus castore's fingerprint of
the Triton version, CPU architecture and Python ABI.

One stored object per group: ``msgpack {"v": 1, "files": {name: bytes}}`` (docs/TORCH.md).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import sys
import uuid
from typing import Any

import msgpack

log = logging.getLogger("castore.torch")

CACHE_NAME = "triton"
GROUP_FORMAT = 1
_LAUNCHER_SUFFIXES = (".so", ".pyd", ".dylib")  # Triton's compiled C launchers (compile_module_from_src)

try:  # Triton checks that TRITON_CACHE_MANAGER names a subclass of its CacheManager
    from triton.runtime.cache import CacheManager as _TritonCacheManager
except Exception:  # noqa: BLE001 - no Triton (CPU-only torch): the class is still usable on its own
    _TritonCacheManager = object  # type: ignore[assignment,misc]


@functools.cache
def fingerprint() -> str:
    """What, besides Triton's own key, decides whether a stored Triton artifact runs here."""
    try:
        import triton

        version = triton.__version__
    except Exception:  # noqa: BLE001
        version = "none"
    parts = (version, platform.machine(), sys.implementation.cache_tag, sys.platform)
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def store_key(triton_key: str, filename: str) -> str:
    return f"triton.{fingerprint()}.{triton_key}.{filename}"


def _cache_root(override: bool, dump: bool) -> str:
    """The directory Triton's FileCacheManager would use (its knobs when present, else its environment)."""
    try:
        from triton import knobs

        if dump:
            return knobs.cache.dump_dir
        if override:
            return knobs.cache.override_dir
        return knobs.cache.dir
    except Exception:  # noqa: BLE001 - older Triton or none
        home = os.environ.get("TRITON_HOME") or os.path.expanduser("~")
        if dump:
            return os.environ.get("TRITON_DUMP_DIR", "").strip() or os.path.join(home, ".triton", "dump")
        if override:
            return os.environ.get("TRITON_OVERRIDE_DIR", "").strip() or os.path.join(home, ".triton", "override")
        return os.environ.get("TRITON_CACHE_DIR", "").strip() or os.path.join(home, ".triton", "cache")


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and bool(name) and name not in (".", "..") and "/" not in name and os.sep not in name and "\0" not in name


def _active_session():  # noqa: ANN202 - castore.torch.session.StoreSession | None
    try:
        from castore.torch import active_session

        return active_session()
    except Exception:  # noqa: BLE001
        return None


def _worth_asking() -> bool:
    """Whether a local miss is worth a store request. Not for the candidate configs a kernel's tuning compiles:
    it tunes because its autotune result was not found, so no machine published them, and each request is a
    round trip on the tuning's critical path (most of the 66 to 78 groups GPT-2 with coordinate descent compiles).
    The configs a warm start compiles from a stored winner are compiled outside tuning, and still asked for."""
    from castore.torch.compile_activity import tuning_in_this_thread

    return not tuning_in_this_thread()


class CastoreTritonCacheManager(_TritonCacheManager):  # type: ignore[misc,valid-type]
    """Triton's file cache layout and semantics, with the store behind it (see the module docstring)."""

    def __init__(self, key: str, override: bool = False, dump: bool = False) -> None:
        self.key = key
        # Dump and override dirs are for a developer's eyes and hands: never filled from or sent to the store.
        self._remote = not (override or dump)
        self.cache_dir = os.path.join(_cache_root(override, dump), key)
        self.lock_path = os.path.join(self.cache_dir, "lock")
        if not override:
            os.makedirs(self.cache_dir, exist_ok=True)

    # -- Triton's file cache (same layout and atomicity as triton.runtime.cache.FileCacheManager) ----------------
    def _make_path(self, filename: str) -> str:
        return os.path.join(self.cache_dir, filename)

    def has_file(self, filename: str) -> bool:
        return os.path.exists(self._make_path(filename))

    def _local_file(self, filename: str) -> str | None:
        return self._make_path(filename) if self.has_file(filename) else None

    def _local_group(self, filename: str) -> dict[str, str] | None:
        grp = self._make_path(f"__grp__{filename}")
        try:
            with open(grp) as f:
                child_paths = json.load(f).get("child_paths")
        except (OSError, ValueError, AttributeError):
            return None
        if not isinstance(child_paths, dict):
            return None
        return {name: path for name, path in child_paths.items() if os.path.exists(path)}

    def _write(self, data: bytes | str, filename: str) -> str:
        if isinstance(data, str):
            data = data.encode("utf-8")
        os.makedirs(self.cache_dir, exist_ok=True)
        path = self._make_path(filename)
        tmp_dir = os.path.join(self.cache_dir, f"tmp.pid_{os.getpid()}_{uuid.uuid4()}")
        os.makedirs(tmp_dir, exist_ok=True)
        tmp = os.path.join(tmp_dir, filename)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # readers never see a partial file
        os.removedirs(tmp_dir)
        return path

    def _write_group(self, filename: str, group: dict[str, str]) -> str:
        return self._write(json.dumps({"child_paths": group}), f"__grp__{filename}")

    # -- CacheManager --------------------------------------------------------------------------------------------
    def get_file(self, filename: str) -> str | None:
        path = self._local_file(filename)
        if path is None and self._remote and filename.endswith(_LAUNCHER_SUFFIXES) and _worth_asking():
            session = _active_session()
            data = session.get(CACHE_NAME, store_key(self.key, filename)) if session else None
            if data is not None:
                path = self._write(data, filename)
        return path

    def put(self, data: bytes | str, filename: str, binary: bool = True) -> str:
        payload = data if isinstance(data, bytes) else str(data).encode("utf-8")
        path = self._write(payload, filename)
        if self._remote and filename.endswith(_LAUNCHER_SUFFIXES):
            session = _active_session()
            if session is not None:
                session.put(CACHE_NAME, store_key(self.key, filename), payload)
        return path

    def get_group(self, filename: str) -> dict[str, str] | None:
        group = self._local_group(filename)
        if group is not None or not self._remote or not _worth_asking():
            return group
        session = _active_session()
        if session is None:
            return None
        blob = session.get(CACHE_NAME, store_key(self.key, filename))
        if blob is None:
            return None
        files = decode_group(blob)
        if files is None:
            log.warning("castore: ignoring a malformed Triton cache entry for %s/%s", self.key, filename)
            return None
        try:
            paths = {name: self._write(data, name) for name, data in files.items()}
            self._write_group(filename, paths)
        except OSError as exc:
            log.warning("castore: cannot write Triton cache entry %s: %s", self.cache_dir, exc)
            return None
        return self._local_group(filename)

    def put_group(self, filename: str, group: dict[str, str]) -> str:
        path = self._write_group(filename, group)
        if self._remote:
            session = _active_session()
            if session is not None:
                session.defer(_upload_group, session, store_key(self.key, filename), dict(group))
        return path


def encode_group(files: dict[str, bytes]) -> bytes:
    return msgpack.packb({"v": GROUP_FORMAT, "files": files}, use_bin_type=True)


def decode_group(blob: bytes) -> dict[str, bytes] | None:
    """The files of a stored group, or None when the object is not one this version can read safely."""
    try:
        obj = msgpack.unpackb(blob, raw=False, strict_map_key=True)
    except Exception:  # noqa: BLE001 - any msgpack error is a malformed entry
        return None
    if not isinstance(obj, dict) or obj.get("v") != GROUP_FORMAT or not isinstance(obj.get("files"), dict):
        return None
    files = obj["files"]
    if not files or not all(_plain_name(n) and isinstance(d, bytes) for n, d in files.items()):
        return None
    return files


def _upload_group(session: Any, key: str, group: dict[str, str]) -> None:
    files: dict[str, bytes] = {}
    for name, path in group.items():
        if not _plain_name(name):
            return
        try:
            with open(path, "rb") as f:
                files[name] = f.read()
        except OSError:
            return  # a group whose files are gone is not worth storing
    if files:
        session.put(CACHE_NAME, key, encode_group(files))
