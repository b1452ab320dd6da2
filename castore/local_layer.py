"""The node-local read-through layer: a bounded LRU disk cache of chunk and manifest objects in front of a backend.

Like bazel-remote's disk cache wrapping a proxy: reads are served from disk when present, fetched once from
the inner backend otherwise. Safe for many processes: files appear by atomic rename, and a striped
``flock`` makes concurrent readers of one missing object wait for a single download.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from castore.backends.base import Backend, ObjectInfo
from castore.fsutil import read_file, write_atomic

log = logging.getLogger(__name__)

LOCK_STRIPES = 1024
EVICT_TO = 0.8  # after eviction the layer holds at most this fraction of its bound


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    bytes_local: int = 0
    bytes_fetched: int = 0
    evicted_files: int = 0


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
        self._known_bytes: int | None = None  # from the last scan, plus what this process wrote since

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
                self._store_local(path, data)
                self._count(hit=False, nbytes=len(data))
        return data

    def get_range(self, path: str, start: int, end: int) -> bytes | None:
        # Ranges of large objects (packs) pass through: the layer holds whole objects only.
        return self.inner.get_range(path, start, end)

    def admit(self, path: str, data: bytes) -> None:
        """Hold an object the caller fetched and verified itself (a bundle's prefetch, read from a pack)."""
        if not self.holds(path):
            self._store_local(path, data)

    def holds(self, path: str) -> bool:
        """Whether this node already holds the object (no request to the inner backend)."""
        return os.path.isfile(self.local_path(path))

    def put(self, path: str, data: bytes, *, if_absent: bool = False) -> bool:
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
        try:
            os.unlink(self.local_path(path))
        except (FileNotFoundError, NotADirectoryError):
            pass

    def clear(self) -> None:
        for local, _, _ in self._scan():
            try:
                os.unlink(local)
            except FileNotFoundError:
                pass
        self._known_bytes = 0

    # -- size bound ------------------------------------------------------------------------------
    def _scan(self) -> list[tuple[str, int, float]]:
        files = []
        for dirpath, _, filenames in os.walk(self._objects):
            for name in filenames:
                full = os.path.join(dirpath, name)
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue
                files.append((full, st.st_size, st.st_mtime))
        return files

    def usage(self) -> tuple[int, int]:
        """(files, bytes) held now."""
        files = self._scan()
        return len(files), sum(size for _, size, _ in files)

    def _note_written(self, nbytes: int) -> None:
        with self._stats_lock:
            if self._known_bytes is None:
                self._known_bytes = self.usage()[1]
            else:
                self._known_bytes += nbytes
            over = self._known_bytes > self.max_bytes
        if over:
            self.evict()

    def evict(self) -> None:
        """Remove least recently used files until the layer holds at most EVICT_TO of its bound."""
        fd = os.open(os.path.join(self._locks, "evict.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another process is evicting
            files = sorted(self._scan(), key=lambda f: f[2])
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
            with self._stats_lock:
                self._known_bytes = total
                self.stats.evicted_files += removed
        finally:
            os.close(fd)
