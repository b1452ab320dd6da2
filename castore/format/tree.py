"""Directory trees as one blob: regular files' bytes concatenated in a fixed order (docs/FORMAT.md, 'Trees')."""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from castore.errors import FormatError
from castore.format.manifest import TreeEntry


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


def safe_relpath(path: str) -> PurePosixPath:
    """Reject entries that would escape the destination directory."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or any(part in ("..", "") for part in path.split("/")) or "\x00" in path:
        raise FormatError(f"tree entry path {path!r} is not a safe relative path")
    return p
