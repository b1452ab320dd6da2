"""Namespaces, keys and the object paths they map to (docs/FORMAT.md, 'Layout')."""

from __future__ import annotations

import re

from castore.errors import InvalidKeyError

ROOT = "castore/v1"
# A key is one path component in every backend: a file name on a file system (file:// stores, the local layer)
# holds at most 255 bytes.
MAX_KEY_BYTES = 250
MAX_NAMESPACE_BYTES = 128

# Keys come from PyTorch (e.g. 'pt2:fx-graph-v1::fabc...:c1') and from users. The charset is what every
# S3-compatible store and every POSIX file system accepts verbatim in one path component.
_KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:=+@,-]*")
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")


def _check(value: object, what: str, pattern: re.Pattern[str], limit: int) -> str:
    if not isinstance(value, str):
        raise InvalidKeyError(f"{what} must be a str, not {type(value).__name__}")
    if not value:
        raise InvalidKeyError(f"{what} must not be empty")
    if len(value.encode("utf-8", "surrogatepass")) > limit:
        raise InvalidKeyError(f"{what} is longer than {limit} bytes ({len(value)} characters)")
    if "\x00" in value:
        raise InvalidKeyError(f"{what} contains NUL")
    if "/" in value or "\\" in value:
        raise InvalidKeyError(f"{what} {value!r} contains a path separator")
    if ".." in value:
        raise InvalidKeyError(f"{what} {value!r} contains '..'")
    if not pattern.fullmatch(value):
        raise InvalidKeyError(f"{what} {value!r} has characters outside {pattern.pattern}")
    return value


def validate_key(key: object) -> str:
    return _check(key, "key", _KEY_RE, MAX_KEY_BYTES)


def validate_namespace(namespace: object) -> str:
    return _check(namespace, "namespace", _NAMESPACE_RE, MAX_NAMESPACE_BYTES)


def chunk_path(digest: bytes) -> str:
    hexd = digest.hex()
    return f"{ROOT}/chunks/{hexd[:2]}/{hexd}"


def manifest_prefix(namespace: str) -> str:
    return f"{ROOT}/manifests/{validate_namespace(namespace)}/"


def manifest_path(namespace: str, key: str) -> str:
    return manifest_prefix(namespace) + validate_key(key)


def parse_chunk_path(path: str) -> bytes | None:
    """The digest named by a chunk object path, or None if the path is not one."""
    prefix = f"{ROOT}/chunks/"
    if not path.startswith(prefix):
        return None
    name = path.rsplit("/", 1)[-1]
    if len(name) != 64:
        return None
    try:
        return bytes.fromhex(name)
    except ValueError:
        return None
