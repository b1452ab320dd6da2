"""The one small interface every backend implements.

A get is a hit (bytes), a miss (None) or an error (BackendError): never confused. Paths are the
'/'-separated object names of docs/FORMAT.md, relative to the backend's root or bucket prefix.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

from castore.errors import ReadOnlyError


class Backend(ABC):
    #: A URL that reopens this backend (secrets removed).
    url: str = ""
    #: How many requests this backend serves well at once; sizes the store's thread pool.
    max_concurrency: int = 16

    @abstractmethod
    def get(self, path: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""

    @abstractmethod
    def put(self, path: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Write the object. With if_absent, write only if nothing is there; return False if something was."""

    @abstractmethod
    def exists(self, path: str) -> bool: ...

    @abstractmethod
    def delete(self, path: str) -> None:
        """Remove the object; removing a missing object is not an error."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(path, size) of every object whose path starts with prefix."""

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

    def put(self, path: str, data: bytes, *, if_absent: bool = False) -> bool:
        raise ReadOnlyError(f"{self.url} is read-only")

    def exists(self, path: str) -> bool:
        return self.inner.exists(path)

    def delete(self, path: str) -> None:
        raise ReadOnlyError(f"{self.url} is read-only")

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        return self.inner.list(prefix)

    def close(self) -> None:
        self.inner.close()
