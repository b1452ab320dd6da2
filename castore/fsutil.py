"""Small file-system helpers shared by the file backend and the local layer."""

from __future__ import annotations

import os
import tempfile


def copy_atomic(source: str, path: str) -> None:
    """Copy a file through a temp file and rename (the kernel copies: no bytes pass through Python)."""
    import shutil

    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, path)
        tmp = ""
    finally:
        if tmp:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def write_atomic(path: str, data: bytes | memoryview, *, if_absent: bool = False, fsync: bool = False) -> bool:
    """Write through a temp file and rename (or link, for if_absent), so readers never see a partial file.

    Returns False when if_absent is set and the file already exists.
    """
    directory = os.path.dirname(path) or "."  # a bare file name lives in the current directory
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if if_absent:
            try:
                os.link(tmp, path)  # atomic create-if-absent
            except FileExistsError:
                return False
            return True
        os.replace(tmp, path)
        tmp = ""
        return True
    finally:
        if tmp:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def read_file(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (os.umask sets it, racing threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
