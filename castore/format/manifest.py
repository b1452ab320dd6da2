"""Manifests: msgpack maps that describe one keyed blob (docs/FORMAT.md, 'Manifests')."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from castore.errors import ManifestError, UnsupportedFormatVersion
from castore.format import codec as codecs
from castore.format.chunking import MAX_CHUNK_SIZE, ChunkerParams

FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 16 << 20
MAX_CHUNKS = 1 << 20
MAX_INLINE_BYTES = 64 << 10
# Writers inline blobs up to this size: one request reads them.
INLINE_THRESHOLD = 16 << 10
MAX_CREATED = 1 << 34  # seconds: year 2514; a larger, negative, inf or nan 'created' is malformed
KINDS = ("blob", "tree", "bundle")
MetaValue = str | int | float | bool | None


@dataclass(frozen=True)
class ChunkRef:
    digest: bytes
    size: int
    stored_size: int
    codec: str


@dataclass(frozen=True)
class TreeEntry:
    """One entry of a directory tree; regular files' bytes follow each other in the blob, in entry order."""

    path: str
    type: str  # 'f' file, 'd' directory
    mode: int
    size: int


@dataclass
class Manifest:
    namespace: str
    key: str
    size: int
    digest: bytes
    kind: str = "blob"
    chunks: list[ChunkRef] = field(default_factory=list)
    chunker: ChunkerParams | None = None
    inline: bytes | None = None  # a whole chunk object (header + payload) for small blobs
    files: list[TreeEntry] = field(default_factory=list)
    refs: list[tuple[str, str]] = field(default_factory=list)
    meta: dict[str, MetaValue] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    writer: str = ""

    @property
    def stored_size(self) -> int:
        return len(self.inline) if self.inline is not None else sum(c.stored_size for c in self.chunks)

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "ns": self.namespace,
            "key": self.key,
            "size": self.size,
            "digest": self.digest,
            "created": self.created,
            "writer": self.writer,
            "meta": self.meta,
        }
        if self.inline is not None:
            doc["inline"] = self.inline
        else:
            doc["chunker"] = self.chunker.to_wire() if self.chunker else None
            doc["chunks"] = [[c.digest, c.size, c.stored_size, c.codec] for c in self.chunks]
        if self.kind == "tree":
            doc["files"] = [[e.path, e.type, e.mode, e.size] for e in self.files]
        if self.refs:
            doc["refs"] = [list(r) for r in self.refs]
        return msgpack.packb(doc, use_bin_type=True)

    @classmethod
    def from_bytes(cls, raw: bytes, *, max_size: int) -> Manifest:
        """Parse and validate. ``max_size`` bounds the blob size a reader will accept (decompression bombs)."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest is {len(raw)} bytes, over the {MAX_MANIFEST_BYTES} byte limit")
        try:
            doc = msgpack.unpackb(
                raw,
                raw=False,
                strict_map_key=True,
                max_bin_len=MAX_INLINE_BYTES,
                max_str_len=1 << 20,
                max_array_len=MAX_CHUNKS,
                max_map_len=4096,
            )
        except Exception as exc:  # msgpack raises several unrelated types on bad input
            raise ManifestError(f"manifest is not valid msgpack: {exc}") from exc
        if not isinstance(doc, dict):
            raise ManifestError("manifest is not a map")
        version = doc.get("format")
        if version != FORMAT_VERSION:
            if isinstance(version, int) and version > FORMAT_VERSION:
                raise UnsupportedFormatVersion(version, FORMAT_VERSION)
            raise ManifestError(f"manifest has no valid format version: {version!r}")
        return _parse_v1(doc, max_size)


def _want(doc: dict[str, Any], name: str, typ: type) -> Any:
    value = doc.get(name)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ManifestError(f"manifest field {name!r} is missing or has the wrong type")
    return value


def _parse_v1(doc: dict[str, Any], max_size: int) -> Manifest:
    kind = _want(doc, "kind", str)
    if kind not in KINDS:
        raise ManifestError(f"unknown manifest kind {kind!r}")
    size = _want(doc, "size", int)
    if size < 0 or size > max_size:
        raise ManifestError(f"manifest declares {size} bytes, outside [0, {max_size}]")
    digest = _want(doc, "digest", bytes)
    if len(digest) != 32:
        raise ManifestError("manifest digest is not 32 bytes")
    meta = doc.get("meta") or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
        raise ManifestError("manifest meta is not a map of strings")
    created = doc.get("created", 0.0)
    if not isinstance(created, (int, float)) or isinstance(created, bool) or not 0 <= created <= MAX_CREATED:
        raise ManifestError(f"manifest 'created' is not a time in [0, {MAX_CREATED}]: {created!r}")
    m = Manifest(
        namespace=_want(doc, "ns", str),
        key=_want(doc, "key", str),
        size=size,
        digest=digest,
        kind=kind,
        meta=meta,
        created=float(created),
        writer=str(doc.get("writer", "")),
    )
    if "inline" in doc:
        inline = _want(doc, "inline", bytes)
        codecs.codec_of(inline)  # header check: typed error on garbage
        m.inline = inline
    else:
        m.chunker = _parse_chunker(doc.get("chunker"))
        chunks = _want(doc, "chunks", list)
        total = 0
        for item in chunks:
            if not (isinstance(item, list) and len(item) == 4):
                raise ManifestError("chunk entry is not [digest, size, stored_size, codec]")
            d, n, stored, codec = item
            if not (isinstance(d, bytes) and len(d) == 32):
                raise ManifestError("chunk digest is not 32 bytes")
            if not (isinstance(n, int) and 0 < n <= MAX_CHUNK_SIZE):
                raise ManifestError(f"chunk size {n!r} outside (0, {MAX_CHUNK_SIZE}]")
            if not (isinstance(stored, int) and 0 < stored <= MAX_CHUNK_SIZE + codecs.HEADER_SIZE + 1024):
                raise ManifestError(f"chunk stored size {stored!r} out of range")
            if codec not in (codecs.CODEC_RAW, codecs.CODEC_ZSTD):
                raise ManifestError(f"unknown chunk codec {codec!r}")
            total += n
            m.chunks.append(ChunkRef(d, n, stored, codec))
        if total != size:
            raise ManifestError(f"chunk sizes add up to {total}, manifest declares {size}")
    if kind == "tree":
        m.files = _parse_files(doc.get("files"), size)
    refs = doc.get("refs") or []
    if not isinstance(refs, list) or not all(isinstance(r, list) and len(r) == 2 and all(isinstance(x, str) for x in r) for r in refs):
        raise ManifestError("manifest refs are not [[namespace, key], ...]")
    m.refs = [(r[0], r[1]) for r in refs]
    return m


def _parse_chunker(value: object) -> ChunkerParams | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ManifestError("manifest chunker is not a map")
    sizes = [value.get(name) for name in ("min", "avg", "max")]
    if not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_CHUNK_SIZE for n in sizes):
        raise ManifestError(f"manifest chunker sizes {sizes!r} are not integers in (0, {MAX_CHUNK_SIZE}]")
    if not (sizes[0] <= sizes[1] <= sizes[2]) or not isinstance(value.get("algo"), str):
        raise ManifestError("manifest chunker is malformed")
    return ChunkerParams(min_size=sizes[0], avg_size=sizes[1], max_size=sizes[2], algorithm=value["algo"])


def _parse_files(value: object, blob_size: int) -> list[TreeEntry]:
    if not isinstance(value, list):
        raise ManifestError("tree manifest has no file list")
    entries = []
    total = 0
    for item in value:
        if not (isinstance(item, list) and len(item) == 4):
            raise ManifestError("tree entry is not [path, type, mode, size]")
        path, typ, mode, size = item
        if not (isinstance(path, str) and typ in ("f", "d") and isinstance(mode, int) and isinstance(size, int) and size >= 0):
            raise ManifestError(f"tree entry {item!r} is malformed")
        if typ == "f":
            total += size
        entries.append(TreeEntry(path, typ, mode & 0o7777, size))
    if total != blob_size:
        raise ManifestError(f"tree files add up to {total} bytes, blob has {blob_size}")
    return entries
