"""The node-local read-through layer: a bounded LRU disk cache of chunk and manifest objects in front of a backend.

Like bazel-remote's disk cache wrapping a proxy: reads are served from disk when present, fetched once from
the inner backend otherwise. Safe for many processes: files appear by atomic rename, and a striped
``flock`` makes concurrent readers of one missing object wait for a single download.

Nothing unverified is admitted: :meth:`LocalLayer.get_checked` hands fetched bytes to the caller's check (which
decodes and verifies them) and writes them to disk only when it passes, and a local copy that fails the check
is dropped and fetched from the bucket once. Plain :meth:`LocalLayer.get` admits an object only if the
``admission_check`` the store installs accepts it.

The size bound holds across processes: every process adds what it writes to one shared counter file (under
``flock``) and evicts when the shared total passes the bound. At any moment the layer may exceed its bound by
what is being written at that moment (at most one object per writing thread, see ``docs/RELIABILITY.md``);
once writers are idle it holds at most its bound.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from castore.backends.base import Backend, ObjectInfo
from castore.errors import FormatError
from castore.fsutil import read_file, write_atomic

log = logging.getLogger(__name__)

LOCK_STRIPES = 1024
EVICT_TO = 0.8  # after eviction the layer holds at most this fraction of its bound
STALE_TMP_SECONDS = 3600  # an unfinished temporary file this old is a killed writer's: eviction removes it
T = TypeVar("T")
#: A check of fetched bytes: returns what the caller wants from them (decoded bytes) or raises FormatError.
#: The flag says whether the bytes came from this node's disk (the caller may check those more cheaply).
Check = Callable[[bytes, bool], T]


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    bytes_local: int = 0
    bytes_fetched: int = 0
    evicted_files: int = 0
    rejected: int = 0  # fetched objects that failed their check and were not admitted
    dropped_corrupt: int = 0  # local copies that failed their check and were removed


class LocalLayer(Backend):
    def __init__(self, inner: Backend, directory: str, max_bytes: int) -> None:
        self.inner = inner
        self.url = inner.url
        self.max_concurrency = inner.max_concurrency
        self.directory = os.path.abspath(os.path.expanduser(directory))
        self.max_bytes = max_bytes
        self._objects = os.path.join(self.directory, "objects")
        self._locks = os.path.join(self.directory, "locks")
        os.makedirs(self._objects, exist_ok=True)
        os.makedirs(self._locks, exist_ok=True)
        self.stats = LayerStats()
        self._stats_lock = threading.Lock()
        self._usage_file = os.path.join(self.directory, "usage")  # shared by every process: total bytes held
        #: Called on bytes fetched by plain get() before they are written to disk; raising FormatError keeps
        #: them out of the layer (the store installs one that parses manifests and verifies chunks).
        self.admission_check: Callable[[str, bytes], None] | None = None

    # -- paths and locks -------------------------------------------------------------------------
    def local_path(self, path: str) -> str:
        return os.path.join(self._objects, *path.split("/"))

    @contextmanager
    def _stripe_lock(self, path: str) -> Iterator[None]:
        stripe = zlib.crc32(path.encode()) % LOCK_STRIPES
        fd = os.open(os.path.join(self._locks, f"{stripe:04d}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _count(self, *, hit: bool, nbytes: int) -> None:
        with self._stats_lock:
            if hit:
                self.stats.hits += 1
                self.stats.bytes_local += nbytes
            else:
                self.stats.misses += 1
                self.stats.bytes_fetched += nbytes

    def _read_local(self, path: str) -> bytes | None:
        local = self.local_path(path)
        data = read_file(local)
        if data is not None:
            try:
                os.utime(local)  # LRU recency
            except OSError:
                pass
        return data

    def _store_local(self, path: str, data: bytes) -> None:
        try:
            write_atomic(self.local_path(path), data)
        except OSError as exc:  # a full or read-only disk must not fail the read
            log.warning("castore: local layer cannot write %s: %s", path, exc)
            return
        self._note_written(len(data))

    # -- Backend ---------------------------------------------------------------------------------
    def get(self, path: str) -> bytes | None:
        data = self._read_local(path)
        if data is not None:
            self._count(hit=True, nbytes=len(data))
            return data
        with self._stripe_lock(path):
            data = self._read_local(path)  # another process may have fetched it while we waited
            if data is not None:
                self._count(hit=True, nbytes=len(data))
                return data
            data = self.inner.get(path)
            if data is not None:
                self._count(hit=False, nbytes=len(data))
                if self._admissible(path, data):
                    self._store_local(path, data)
        return data

    def get_range(self, path: str, start: int, end: int) -> bytes | None:
        # Ranges of large objects (packs) pass through: the layer holds whole objects only.
        return self.inner.get_range(path, start, end)

    def _admissible(self, path: str, data: bytes) -> bool:
        if self.admission_check is None:
            return True
        try:
            self.admission_check(path, data)
        except FormatError:
            with self._stats_lock:
                self.stats.rejected += 1
            return False
        return True

    def get_checked(self, path: str, check: Check[T]) -> tuple[T, bool] | None:
        """(check(bytes), came from disk), or None when the object does not exist.

        A local copy that fails the check is removed and the object is fetched from the inner backend once;
        fetched bytes are written to disk only after they pass. FormatError from checking the inner backend's
        bytes propagates (that copy is bad; nothing was admitted). BackendError propagates.
        """
        data = self._read_local(path)
        if data is not None:
            result = self._check_local(path, data, check)
            if result is not None:
                return result
        with self._stripe_lock(path):
            data = self._read_local(path)  # another process may have fetched it while we waited
            if data is not None:
                result = self._check_local(path, data, check)
                if result is not None:
                    return result
            data = self.inner.get(path)
            if data is None:
                return None
            self._count(hit=False, nbytes=len(data))
            try:
                value = check(data, False)
            except FormatError:
                with self._stats_lock:
                    self.stats.rejected += 1
                raise
            self._store_local(path, data)
            return value, False

    def _check_local(self, path: str, data: bytes, check: Check[T]) -> tuple[T, bool] | None:
        try:
            value = check(data, True)
        except FormatError as exc:
            log.warning("castore: local copy of %s was corrupt (%s); dropped, fetching it from %s", path, exc, self.url)
            with self._stats_lock:
                self.stats.dropped_corrupt += 1
            self.forget(path)
            return None
        self._count(hit=True, nbytes=len(data))
        return value, True

    def local_copy(self, path: str) -> bytes | None:
        """This node's copy of the object, unchecked (repair checks it), or None."""
        return read_file(self.local_path(path))

    def admit(self, path: str, data: bytes) -> None:
        """Hold an object the caller fetched and verified itself (a bundle's prefetch, read from a pack)."""
        if not self.holds(path):
            self._store_local(path, data)

    def holds(self, path: str) -> bool:
        """Whether this node already holds the object (no request to the inner backend)."""
        return os.path.isfile(self.local_path(path))

    def put(self, path: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Write through to the inner backend, then keep a copy (the caller wrote these bytes: trusted)."""
        written = self.inner.put(path, data, if_absent=if_absent)
        if written:
            self._store_local(path, data)
        else:
            self.forget(path)  # the bucket holds another writer's object: read that one next time
        return written

    def exists(self, path: str) -> bool:
        # The inner backend is the truth: a chunk held here may have been removed from the bucket.
        return self.inner.exists(path)

    def head(self, path: str) -> ObjectInfo | None:
        return self.inner.head(path)  # the bucket is the truth, as for exists()

    def delete(self, path: str) -> None:
        self.inner.delete(path)
        self.forget(path)

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        return self.inner.list(prefix)

    def scan(self, prefix: str) -> Iterator[tuple[str, ObjectInfo]]:
        return self.inner.scan(prefix)

    def close(self) -> None:
        self.inner.close()

    def forget(self, path: str) -> None:
        """Drop the local copy (corrupt, or superseded)."""
        local = self.local_path(path)
        try:
            size = os.stat(local).st_size
            os.unlink(local)
        except (FileNotFoundError, NotADirectoryError):
            return
        self._add_usage(-size)

    def clear(self) -> None:
        with self._usage_lock():
            for local, _, _ in self._scan():
                try:
                    os.unlink(local)
                except FileNotFoundError:
                    pass
            self._write_usage(0)

    # -- size bound ------------------------------------------------------------------------------
    def _scan(self, *, remove_stale: bool = False) -> list[tuple[str, int, float]]:
        files = []
        stale_before = time.time() - STALE_TMP_SECONDS
        for dirpath, _, filenames in os.walk(self._objects):
            for name in filenames:
                full = os.path.join(dirpath, name)
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue
                if name.startswith(".tmp-"):
                    # A write in flight (its writer counts it once it lands), or the leftover of a killed one.
                    if remove_stale and st.st_mtime < stale_before:
                        try:
                            os.unlink(full)
                        except FileNotFoundError:
                            pass
                    continue
                files.append((full, st.st_size, st.st_mtime))
        return files

    def usage(self) -> tuple[int, int]:
        """(files, bytes) held now."""
        files = self._scan()
        return len(files), sum(size for _, size, _ in files)

    @contextmanager
    def _usage_lock(self) -> Iterator[None]:
        fd = os.open(os.path.join(self._locks, "usage.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_usage(self) -> int | None:
        raw = read_file(self._usage_file)
        try:
            return int(raw) if raw is not None else None
        except ValueError:
            return None  # a damaged counter is rebuilt by a scan

    def _write_usage(self, total: int) -> None:
        try:
            write_atomic(self._usage_file, b"%d" % max(total, 0))
        except OSError as exc:
            log.debug("castore: cannot update the local layer's usage counter: %s", exc)

    def _add_usage(self, nbytes: int) -> int:
        """Add nbytes to the shared total (scanning once when there is none yet); returns the new total."""
        with self._usage_lock():
            total = self._read_usage()
            total = self.usage()[1] if total is None else total + nbytes
            self._write_usage(total)
            return total

    def _note_written(self, nbytes: int) -> None:
        if self._add_usage(nbytes) > self.max_bytes:
            self.evict()

    def evict(self) -> None:
        """Remove least recently used files until the layer holds at most EVICT_TO of its bound.

        Blocks while another process evicts, then re-reads the shared total: it is usually under the bound by then.
        """
        fd = os.open(os.path.join(self._locks, "evict.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            current = self._read_usage()
            if current is not None and current <= self.max_bytes:
                return  # another process evicted while we waited
            with self._usage_lock():  # writers wait: no update is lost between the scan and the new total
                files = sorted(self._scan(remove_stale=True), key=lambda f: f[2])
                total = sum(size for _, size, _ in files)
                target = int(self.max_bytes * EVICT_TO)
                removed = 0
                for full, size, _ in files:
                    if total <= target:
                        break
                    try:
                        os.unlink(full)
                    except FileNotFoundError:
                        pass
                    total -= size
                    removed += 1
                self._write_usage(total)
            with self._stats_lock:
                self.stats.evicted_files += removed
        finally:
            os.close(fd)
