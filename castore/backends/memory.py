"""memory://name: a process-local backend for tests. The same name is the same store within one process."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from castore.backends.base import Backend

_stores: dict[str, dict[str, bytes]] = {}
_stores_lock = threading.Lock()


class MemoryBackend(Backend):
    def __init__(self, name: str = "") -> None:
        self.url = f"memory://{name}"
        with _stores_lock:
            self._objects = _stores.setdefault(name, {}) if name else {}
        self._lock = threading.Lock()

    def get(self, path: str) -> bytes | None:
        return self._objects.get(path)

    def put(self, path: str, data: bytes, *, if_absent: bool = False) -> bool:
        with self._lock:
            if if_absent and path in self._objects:
                return False
            self._objects[path] = bytes(data)
            return True

    def exists(self, path: str) -> bool:
        return path in self._objects

    def delete(self, path: str) -> None:
        with self._lock:
            self._objects.pop(path, None)

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        for path in sorted(p for p in list(self._objects) if p.startswith(prefix)):
            data = self._objects.get(path)
            if data is not None:
                yield path, len(data)
