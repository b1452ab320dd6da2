"""Restoring a stored directory tree under DEST, safely: every entry checked before anything is written, only
regular files and directories, strictly inside DEST, never through a symlink, with safe modes (docs/FORMAT.md,
'Trees')."""

from __future__ import annotations

import os

from castore.errors import UnsafeTreeError
from castore.format.manifest import Manifest, TreeEntry
from castore.format.tree import checked_entries, safe_mode


def extract_tree(manifest: Manifest, data: bytes | bytearray | memoryview, dest: str | os.PathLike[str]) -> None:
    """Write a tree manifest's files under dest, each atomically, with a safe mode (format/tree.safe_mode).

    Only regular files and directories, strictly inside dest: every entry is checked, and dest's existing
    directories are checked for symlinks in the way, before anything is written; directories are then opened
    relative to their parent with O_NOFOLLOW, so nothing is written or chmod-ed through a symlink.
    """
    entries = checked_entries(manifest.files)
    if sum(e.size for e, _ in entries if e.type == "f") != len(data):
        raise UnsafeTreeError(f"tree {manifest.namespace}/{manifest.key}: files add up to a size other than the blob's")
    root = os.fspath(dest)
    os.makedirs(root, exist_ok=True)
    _check_dest(root, entries)
    view = memoryview(data)
    dirs: dict[tuple[str, ...], int] = {(): os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)}

    def open_dir(parts: tuple[str, ...]) -> int:
        fd = dirs.get(parts)
        if fd is None:
            parent = open_dir(parts[:-1])
            try:
                os.mkdir(parts[-1], 0o700, dir_fd=parent)
            except FileExistsError:
                pass
            try:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            except OSError as exc:  # ELOOP (a symlink) or ENOTDIR: appeared since the check
                raise UnsafeTreeError(f"{'/'.join(parts)} in {root} is not a directory: {exc.strerror}") from exc
            dirs[parts] = fd
        return fd

    try:
        dir_modes = []
        pos = 0
        for entry, parts in entries:
            if entry.type == "d":
                dir_modes.append((open_dir(parts), safe_mode(entry.mode) | 0o700))
                continue
            _write_file_at(open_dir(parts[:-1]), parts[-1], view[pos : pos + entry.size], safe_mode(entry.mode))
            pos += entry.size
        for fd, mode in dir_modes:
            os.fchmod(fd, mode)
    finally:
        for fd in dirs.values():
            os.close(fd)


def _check_dest(root: str, entries: list[tuple[TreeEntry, tuple[str, ...]]]) -> None:
    """Before writing: no existing symlink or non-directory where a directory goes, no directory where a file goes."""
    import stat as stat_

    seen: set[tuple[str, ...]] = set()
    for entry, parts in entries:
        dir_parts = parts if entry.type == "d" else parts[:-1]
        for i in range(1, len(dir_parts) + 1):
            prefix = dir_parts[:i]
            if prefix in seen:
                continue
            seen.add(prefix)
            try:
                st = os.lstat(os.path.join(root, *prefix))  # parents already checked: no symlink followed
            except FileNotFoundError:
                break  # created by the restore
            if not stat_.S_ISDIR(st.st_mode):
                raise UnsafeTreeError(f"{'/'.join(prefix)} in {root} exists and is not a directory (a symlink?)")
        if entry.type == "f":
            try:
                st = os.lstat(os.path.join(root, *parts))
            except (FileNotFoundError, NotADirectoryError):
                continue
            if stat_.S_ISDIR(st.st_mode):
                raise UnsafeTreeError(f"{entry.path} in {root} exists and is a directory")


def _write_file_at(dir_fd: int, name: str, data: memoryview, mode: int) -> None:
    """Create name in the directory dir_fd atomically (a temporary file renamed over it, never following a link)."""
    import secrets

    tmp = f".tmp-{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), mode)
        try:
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except IsADirectoryError as exc:
            raise UnsafeTreeError(f"{name} exists and is a directory") from exc
        tmp = ""
    finally:
        if tmp:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except FileNotFoundError:
                pass

