"""Helpers of the integrity tests: a request-counting backend wrapper and ways to damage stored objects."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

from castore.backends.base import Backend, ObjectInfo


class CountingBackend(Backend):
    """Wraps a real backend and counts requests, per operation and per (operation, path). close() is left to
    the owner of the inner backend (trials share one S3 client across many stores)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.url = inner.url
        self.max_concurrency = inner.max_concurrency
        self.calls: Counter[str] = Counter()
        self.by_path: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def _count(self, op: str, path: str = "") -> None:
        with self._lock:
            self.calls[op] += 1
            self.by_path[(op, path)] += 1

    def gets_of(self, path: str) -> int:
        return self.by_path[("get", path)]

    def get(self, path: str) -> bytes | None:
        self._count("get", path)
        return self.inner.get(path)

    def put(self, path: str, data: bytes, *, if_absent: bool = False) -> bool:
        self._count("put", path)
        return self.inner.put(path, data, if_absent=if_absent)

    def exists(self, path: str) -> bool:
        self._count("exists", path)
        return self.inner.exists(path)

    def head(self, path: str) -> ObjectInfo | None:
        self._count("head", path)
        return self.inner.head(path)

    def delete(self, path: str) -> None:
        self._count("delete", path)
        self.inner.delete(path)

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        self._count("list", prefix)
        return self.inner.list(prefix)

    def scan(self, prefix: str) -> Iterator[tuple[str, ObjectInfo]]:
        self._count("list", prefix)
        return self.inner.scan(prefix)

    def close(self) -> None:
        pass


def flip_bit(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[(bit // 8) % len(out)] ^= 1 << (bit % 8)
    return bytes(out)


def damage(data: bytes, how: str, other: bytes, rnd) -> bytes | None:  # noqa: ANN001 - random.Random
    """The object's bytes after one kind of damage; None: the object is deleted."""
    if how == "truncate":
        return data[: rnd.randrange(len(data))] if data else b""
    if how == "zero":
        return b""
    if how == "zero-fill":
        return bytes(len(data))
    if how == "flip":
        return flip_bit(data, rnd.randrange(len(data) * 8)) if data else b"\x00"
    if how == "swap":
        return other
    if how == "delete":
        return None
    raise ValueError(how)


DAMAGE = ("truncate", "zero", "zero-fill", "flip", "swap", "delete")
