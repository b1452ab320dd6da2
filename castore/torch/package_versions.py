"""Which installed distribution a top-level package comes from, and its version, read from the one directory of
sys.path that holds the package.

``importlib.metadata.packages_distributions()`` answers the same question by reading the metadata of every
distribution installed (top_level.txt, else the RECORD of each): 0.25 to 1.1 s on a machine with a few hundred
packages, on the critical path of an ahead-of-time load. Here: the distribution named as the package is asked
for first (one lookup), a package outside every sys.path directory that holds installed metadata (a source
tree, PYTHONPATH) has none, and only a package whose distribution has another name (``yaml`` from PyYAML) reads
the metadata of the distributions installed beside it.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.metadata import Distribution

_METADATA_DIRS = (".dist-info", ".egg-info")


@functools.cache
def package_version(top: str) -> str | None:
    """NAME==VERSION of the distribution(s) providing top-level package ``top`` (comma-separated where several
    do); None for code that no installed distribution provides."""
    from importlib import metadata

    try:
        return f"{top}=={metadata.version(top)}"
    except metadata.PackageNotFoundError:
        pass
    except Exception:  # noqa: BLE001 - broken metadata: the caller's file digests still cover the code
        return None
    root = _sys_path_root(top)
    if root is None or not _holds_metadata(root):
        return None
    found = set()
    for dist in _distributions_in(root):
        if top in _top_names(dist):
            found.add(f"{dist.metadata['Name']}=={dist.version}")
    return ",".join(sorted(found)) or None


def _sys_path_root(top: str) -> str | None:
    """The sys.path directory the package (or single-file module) was imported from."""
    module = sys.modules.get(top)
    if module is None:
        return None
    places = list(getattr(module, "__path__", None) or [])  # a package's folder(s)
    if not places and getattr(module, "__file__", None):
        places = [module.__file__]
    roots = {os.path.abspath(p or os.curdir) for p in sys.path if isinstance(p, str)}
    for place in places:
        parent = os.path.dirname(os.path.abspath(place))
        if parent in roots:
            return parent
    return None


def _holds_metadata(root: str) -> bool:
    try:
        with os.scandir(root) as entries:
            return any(e.name.endswith(_METADATA_DIRS) for e in entries)
    except OSError:
        return False


def _distributions_in(root: str) -> list[Distribution]:
    from importlib import metadata

    try:
        return list(metadata.distributions(path=[root]))
    except Exception:  # noqa: BLE001 - unreadable metadata: no version, the file digests still cover the code
        return []


def _top_names(dist: Distribution) -> set[str]:
    """The top-level names a distribution installs: its top_level.txt, else the first part of each RECORD path
    (what packages_distributions() reads too)."""
    try:
        listed = dist.read_text("top_level.txt")
        if listed:
            return set(listed.split())
        names = set()
        for f in dist.files or ():
            first = f.parts[0] if f.parts else ""
            if len(f.parts) > 1 and not first.endswith(_METADATA_DIRS) and first != "..":
                names.add(first)
            elif f.suffix == ".py" and len(f.parts) == 1:
                names.add(first[: -len(".py")])
        return names
    except Exception:  # noqa: BLE001 - unreadable metadata
        return set()
