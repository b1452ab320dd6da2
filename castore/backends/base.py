"""The one small interface every backend implements.

A get is a hit (bytes), a miss (None) or an error (BackendError): never confused. Paths are the
'/'-separated object names of docs/FORMAT.md, relative to the backend's root or bucket prefix.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from castore.errors import ReadOnlyError
from castore.redact import redact  # noqa: F401 - where the backends import it from


@dataclass(frozen=True)
class ObjectInfo:
    """What a HEAD tells of a stored object, without its bytes."""

    size: int
    #: The MD5 hex digest of the object's bytes when the backend knows it (an S3 ETag of a single-part upload
    #: without SSE-KMS, or computed by a local backend); None when it does not.
    md5: str | None = None
    #: Last modification, Unix seconds, when the backend knows it (garbage collection's grace period).
    modified: float | None = None


class Backend(ABC):
    #: A URL that reopens this backend (secrets removed).
    url: str = ""
    #: How many requests this backend serves well at once; sizes the store's thread pool.
    max_concurrency: int = 16

    @abstractmethod
    def get(self, path: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""

    def get_range(self, path: str, start: int, end: int) -> bytes | None:
        """Bytes [start, end) of the object (fewer when it is shorter), or None when it does not exist. Backends
        that can read part of an object (an S3 ranged GET, a file seek) override this; the default reads it all."""
        data = self.get(path)
        return None if data is None else data[start:end]

    @abstractmethod
    def put(self, path: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Write the object. With if_absent, write only if nothing is there; return False if something was."""

    @abstractmethod
    def exists(self, path: str) -> bool: ...

    def head(self, path: str) -> ObjectInfo | None:
        """Size (and MD5 where known) of the object, or None when it does not exist. Backends that can answer
        without reading the object override this; the default reads it."""
        data = self.get(path)
        if data is None:
            return None
        import hashlib

        return ObjectInfo(len(data), hashlib.md5(data, usedforsecurity=False).hexdigest())

    @abstractmethod
    def delete(self, path: str) -> None:
        """Remove the object; removing a missing object is not an error."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(path, size) of every object whose path starts with prefix."""

    def scan(self, prefix: str) -> Iterator[tuple[str, ObjectInfo]]:
        """Like list(), with what the listing tells of each object (size, modification time where known)."""
        for path, size in self.list(prefix):
            yield path, ObjectInfo(size)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and threads."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReadOnlyBackend(Backend):
    """Wraps a backend and refuses every write (sccache's read-only wrapper)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.url = inner.url
        self.max_concurrency = inner.max_concurrency

    def get(self, path: str) -> bytes | None:
        return self.inner.get(path)

    def get_range(self, path: str, start: int, end: int) -> bytes | None:
        return self.inner.get_range(path, start, end)

    def put(self, path: str, data: bytes, *, if_absent: bool = False) -> bool:
        raise ReadOnlyError(f"{self.url} is read-only")

    def exists(self, path: str) -> bool:
        return self.inner.exists(path)

    def head(self, path: str) -> ObjectInfo | None:
        return self.inner.head(path)

    def delete(self, path: str) -> None:
        raise ReadOnlyError(f"{self.url} is read-only")

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        return self.inner.list(prefix)

    def scan(self, prefix: str) -> Iterator[tuple[str, ObjectInfo]]:
        return self.inner.scan(prefix)

    def close(self) -> None:
        self.inner.close()
