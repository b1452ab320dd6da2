"""file:///path: objects as files under a directory. The embedded default store."""

from __future__ import annotations

import os
from collections.abc import Iterator

from castore.backends.base import Backend, ObjectInfo
from castore.errors import BackendError
from castore.fsutil import read_file, write_atomic


class FileBackend(Backend):
    max_concurrency = 8

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.url = "file://" + self.root
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise BackendError(f"cannot create store directory {self.root}: {exc}") from exc

    def _path(self, path: str) -> str:
        return os.path.join(self.root, *path.split("/"))

    def get(self, path: str) -> bytes | None:
        try:
            return read_file(self._path(path))
        except OSError as exc:
            raise BackendError(f"{self.url}: reading {path}: {exc}") from exc

    def get_range(self, path: str, start: int, end: int) -> bytes | None:
        try:
            with open(self._path(path), "rb") as f:
                f.seek(start)
                return f.read(max(0, end - start))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise BackendError(f"{self.url}: reading {path}: {exc}") from exc

    def put(self, path: str, data: bytes, *, if_absent: bool = False) -> bool:
        try:
            return write_atomic(self._path(path), data, if_absent=if_absent)
        except OSError as exc:
            raise BackendError(f"{self.url}: writing {path}: {exc}") from exc

    def exists(self, path: str) -> bool:
        return os.path.isfile(self._path(path))

    def head(self, path: str) -> ObjectInfo | None:
        try:
            st = os.stat(self._path(path))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise BackendError(f"{self.url}: stat {path}: {exc}") from exc
        return ObjectInfo(st.st_size, None, st.st_mtime)  # no MD5: the store verifies by reading when it must

    def delete(self, path: str) -> None:
        try:
            os.unlink(self._path(path))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise BackendError(f"{self.url}: deleting {path}: {exc}") from exc

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        for path, info in self.scan(prefix):
            yield path, info.size

    def scan(self, prefix: str) -> Iterator[tuple[str, ObjectInfo]]:
        # Walk only the deepest directory the prefix names, then filter by the rest.
        head, _, _ = prefix.rpartition("/")
        base = self._path(head) if head else self.root
        if not os.path.isdir(base):
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                if name.startswith(".tmp-"):
                    continue
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, self.root).replace(os.sep, "/")
                if rel.startswith(prefix):
                    try:
                        st = os.stat(full)
                    except FileNotFoundError:
                        continue
                    yield rel, ObjectInfo(st.st_size, None, st.st_mtime)
