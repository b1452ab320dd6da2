"""Packs and bundle indexes (docs/FORMAT.md, 'Bundles and packs').

A pack is one large object holding many chunk and manifest objects back to back, so that a node fetches a whole
bundle with a few ranged GETs instead of one request per object. A bundle's blob is its index: for every object
of the closure, which pack holds it and where, and what it must hash to. This module knows bytes only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import msgpack

from castore.errors import FormatError
from castore.format import keys
from castore.format.chunking import MAX_CHUNK_SIZE
from castore.format.codec import HEADER_SIZE
from castore.format.manifest import MAX_MANIFEST_BYTES

PACK_MAGIC = b"CASPACK\x01"
INDEX_FORMAT = 1
BUNDLE_NAMESPACE = "bundles"
MAX_INDEX_ITEMS = 1 << 20
MAX_PACK_BYTES = 1 << 40
MAX_CHUNK_OBJECT = MAX_CHUNK_SIZE + HEADER_SIZE + 1024


class PackError(FormatError):
    """A pack or bundle index does not follow docs/FORMAT.md, or an object read from a pack fails its check."""


def pack_path(digest: bytes) -> str:
    hexd = digest.hex()
    return f"{keys.ROOT}/packs/{hexd[:2]}/{hexd}"


def bundle_key(name: str, version: int) -> str:
    return keys.validate_key(f"{name}.{version}")


def parse_bundle_ref(ref: str) -> tuple[str, int | None]:
    """'NAME' -> (NAME, None): the newest version; 'NAME@N' -> (NAME, N)."""
    name, sep, version = ref.partition("@")
    keys.validate_key(name)
    if not sep:
        return name, None
    if not version.isdigit():
        raise FormatError(f"bundle {ref!r}: the version after '@' must be a number")
    return name, int(version)


def version_of(name: str, key: str) -> int | None:
    """The version a bundle key of ``name`` carries, or None when the key belongs to another name."""
    prefix = name + "."
    rest = key[len(prefix) :] if key.startswith(prefix) else ""
    if not (rest.isascii() and rest.isdigit()) or rest.startswith("0"):
        return None
    return int(rest)


@dataclass(frozen=True)
class Location:
    """Where an object sits: bytes [offset, offset + length) of pack number ``pack`` of the index."""

    pack: int
    offset: int
    length: int


@dataclass(frozen=True)
class ManifestItem:
    namespace: str
    key: str
    sha256: bytes  # of the manifest object's exact bytes
    where: Location

    @property
    def path(self) -> str:
        return keys.manifest_path(self.namespace, self.key)


@dataclass(frozen=True)
class ChunkItem:
    digest: bytes  # of the chunk's uncompressed bytes, as in its object name
    size: int  # uncompressed
    where: Location

    @property
    def path(self) -> str:
        return keys.chunk_path(self.digest)


@dataclass
class BundleIndex:
    packs: list[tuple[bytes, int]] = field(default_factory=list)  # (pack digest, pack size)
    manifests: list[ManifestItem] = field(default_factory=list)
    chunks: list[ChunkItem] = field(default_factory=list)

    def pack_path(self, i: int) -> str:
        return pack_path(self.packs[i][0])

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "format": INDEX_FORMAT,
            "packs": [[d, n] for d, n in self.packs],
            "manifests": [[m.namespace, m.key, m.sha256, *_loc(m.where)] for m in self.manifests],
            "chunks": [[c.digest, c.size, *_loc(c.where)] for c in self.chunks],
        }
        return msgpack.packb(doc, use_bin_type=True)

    @classmethod
    def from_bytes(cls, raw: bytes) -> BundleIndex:
        try:
            doc = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=64, max_str_len=1024,
                                  max_array_len=MAX_INDEX_ITEMS, max_map_len=64)  # fmt: skip
        except Exception as exc:  # msgpack raises several unrelated types on bad input
            raise PackError(f"bundle index is not valid msgpack: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise PackError(f"bundle index has no supported format version: {found!r}")
        index = cls()
        try:
            for d, n in doc["packs"]:
                if not (isinstance(d, bytes) and len(d) == 32 and _uint(n) and n <= MAX_PACK_BYTES):
                    raise PackError("bundle index: bad pack entry")
                index.packs.append((d, n))
            for ns, key, sha, *loc in doc["manifests"]:
                keys.validate_namespace(ns)
                keys.validate_key(key)
                if not (isinstance(sha, bytes) and len(sha) == 32):
                    raise PackError("bundle index: bad manifest digest")
                index.manifests.append(ManifestItem(ns, key, sha, index._location(loc, MAX_MANIFEST_BYTES)))
            for digest, size, *loc in doc["chunks"]:
                if not (isinstance(digest, bytes) and len(digest) == 32 and _uint(size) and 0 < size <= MAX_CHUNK_SIZE):
                    raise PackError("bundle index: bad chunk entry")
                index.chunks.append(ChunkItem(digest, size, index._location(loc, MAX_CHUNK_OBJECT)))
        except (KeyError, TypeError, ValueError) as exc:  # wrong shapes; InvalidKeyError is a ValueError
            raise PackError(f"bundle index is malformed: {exc}") from exc
        return index

    def _location(self, loc: list[Any], max_length: int) -> Location:
        if len(loc) != 3 or not all(_uint(x) for x in loc):
            raise PackError("bundle index: bad object location")
        pack, offset, length = loc
        inside = pack < len(self.packs) and len(PACK_MAGIC) <= offset and offset + length <= self.packs[pack][1]
        if not inside or not 0 < length <= max_length:
            raise PackError("bundle index: object location outside its pack")
        return Location(pack, offset, length)


def _loc(where: Location) -> list[int]:
    return [where.pack, where.offset, where.length]


def _uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class PackBuilder:
    """Objects appended to one pack in memory; ``finish()`` gives its bytes and digest."""

    def __init__(self) -> None:
        self._buf = bytearray(PACK_MAGIC)

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def empty(self) -> bool:
        return len(self._buf) == len(PACK_MAGIC)

    def add(self, obj: bytes) -> tuple[int, int]:
        """Append an object; (offset, length) of it in the pack."""
        offset = len(self._buf)
        self._buf += obj
        return offset, len(obj)

    def finish(self) -> tuple[bytes, bytes]:
        data = bytes(self._buf)
        return hashlib.sha256(data).digest(), data
