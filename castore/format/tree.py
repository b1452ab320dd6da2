"""Directory trees as one blob: regular files' bytes concatenated in a fixed order (docs/FORMAT.md, 'Trees')."""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from castore.errors import UnsafeTreeError
from castore.format.manifest import TreeEntry

#: Permission bits a restore keeps: no setuid/setgid/sticky, no group or world write.
SAFE_MODE_MASK = 0o755
MAX_NAME_BYTES = 255  # one path component, as every POSIX file system allows


def scan_tree(root: str | os.PathLike[str]) -> list[TreeEntry]:
    """Directories and regular files under root, sorted by path; symlinks and special files are skipped."""
    root = Path(root)
    entries: list[TreeEntry] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root)
        for name in dirnames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISDIR(st.st_mode):
                entries.append(TreeEntry((rel_dir / name).as_posix(), "d", stat.S_IMODE(st.st_mode), 0))
        for name in sorted(filenames):
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                entries.append(TreeEntry((rel_dir / name).as_posix(), "f", stat.S_IMODE(st.st_mode), st.st_size))
    entries.sort(key=lambda e: e.path)
    return entries


def safe_mode(mode: int) -> int:
    return mode & SAFE_MODE_MASK


def path_parts(path: object) -> tuple[str, ...]:
    """The components of a stored relative path; UnsafeTreeError for anything that could leave the destination
    or that a file system cannot hold (absolute, empty, '.', '..', NUL, over-long names)."""
    if not isinstance(path, str) or not path or "\x00" in path or path.startswith("/"):
        raise UnsafeTreeError(f"tree entry path {path!r} is not a safe relative path")
    parts = tuple(path.split("/"))
    for part in parts:
        try:
            encoded = os.fsencode(part)
        except UnicodeEncodeError:
            encoded = b""
        if part in ("", ".", "..") or not encoded or len(encoded) > MAX_NAME_BYTES:
            raise UnsafeTreeError(f"tree entry path {path!r} is not a safe relative path")
    return parts


def safe_relpath(path: str) -> PurePosixPath:
    """Reject entries that would escape the destination directory."""
    return PurePosixPath(*path_parts(path))


def checked_entries(entries: list[TreeEntry]) -> list[tuple[TreeEntry, tuple[str, ...]]]:
    """Every entry checked, before anything is written: safe paths, only files and directories, no duplicates,
    no file that another entry uses as a directory."""
    out = []
    kinds: dict[tuple[str, ...], str] = {}
    for entry in entries:
        if entry.type not in ("f", "d"):
            raise UnsafeTreeError(f"tree entry {entry.path!r} has type {entry.type!r}: only files and directories")
        parts = path_parts(entry.path)
        if parts in kinds:
            raise UnsafeTreeError(f"tree entry {entry.path!r} appears twice")
        kinds[parts] = entry.type
        out.append((entry, parts))
    for parts in kinds:
        for i in range(1, len(parts)):
            if kinds.get(parts[:i]) == "f":
                raise UnsafeTreeError(f"tree entry {'/'.join(parts)!r} lies under the file {'/'.join(parts[:i])!r}")
    return out
