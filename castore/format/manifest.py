"""Manifests: msgpack maps that describe one keyed blob (docs/FORMAT.md, 'Manifests').

A version 2 manifest object is an envelope ``{"format": 2, "body": bin, "sha256": bin(32), "sigs": [...]}``: the
body is the msgpack map of the manifest's fields, the checksum makes any damage to it detectable, and each
signature covers ``SIGNED_PREFIX + body``, the exact stored bytes. Version 1 objects (the fields as a bare map,
no checksum, no signatures) are still read as legacy entries.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from castore.errors import ManifestError, UnsupportedFormatVersion
from castore.format import codec as codecs
from castore.format.chunking import MAX_CHUNK_SIZE, ChunkerParams

FORMAT_VERSION = 2
LEGACY_FORMAT_VERSION = 1
# Every signature signs these bytes followed by the body: a signature made for anything else never verifies here.
SIGNED_PREFIX = b"castore manifest v2\0"
SIGNATURE_BYTES = 64
MAX_SIGNATURES = 8
MAX_KEY_NAME_BYTES = 128
MAX_MANIFEST_BYTES = 16 << 20
MAX_CHUNKS = 1 << 20
MAX_INLINE_BYTES = 64 << 10
# Writers inline blobs up to this size: one request reads them.
INLINE_THRESHOLD = 16 << 10
MAX_CREATED = 1 << 34  # seconds: year 2514; a larger, negative, inf or nan 'created' is malformed
KINDS = ("blob", "tree", "bundle")
MetaValue = str | int | float | bool | None


def signed_message(body: bytes) -> bytes:
    """The exact bytes a manifest signature signs."""
    return SIGNED_PREFIX + body


@dataclass(frozen=True)
class Envelope:
    """A manifest object's outer layer, checked (checksum, shapes) but with its body not yet parsed.

    ``body`` is None for a legacy format 1 object, whose fields are ``legacy_doc``.
    """

    format: int
    body: bytes | None
    signatures: tuple[tuple[str, bytes], ...] = ()
    legacy_doc: dict[str, Any] | None = None
    checksum: bytes = b""  # SHA-256 of body, checked

    @property
    def message(self) -> bytes:
        assert self.body is not None
        return signed_message(self.body)


def encode_envelope(body: bytes, signatures: list[tuple[str, bytes]] | tuple[tuple[str, bytes], ...] = ()) -> bytes:
    doc = {
        "format": FORMAT_VERSION,
        "body": body,
        "sha256": hashlib.sha256(body).digest(),
        "sigs": [[name, sig] for name, sig in signatures],
    }
    return msgpack.packb(doc, use_bin_type=True)


def decode_envelope(raw: bytes) -> Envelope:
    """Check a manifest object's size, shape, version and checksum; parse nothing of the body yet."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is {len(raw)} bytes, over the {MAX_MANIFEST_BYTES} byte limit")
    # The envelope's limits are those of the largest field, the body; a legacy object is re-read below with the
    # body's own limits.
    doc = _unpack_map(raw, "manifest", max_bin_len=MAX_MANIFEST_BYTES)
    version = doc.get("format")
    if type(version) is not int:  # not a bool, not a float that compares equal
        raise ManifestError(f"manifest has no valid format version: {version!r}")
    if version == LEGACY_FORMAT_VERSION:
        return Envelope(format=LEGACY_FORMAT_VERSION, body=None, legacy_doc=_unpack_body(raw))
    if version != FORMAT_VERSION:
        if version > FORMAT_VERSION:
            raise UnsupportedFormatVersion(version, FORMAT_VERSION)
        raise ManifestError(f"manifest has no valid format version: {version!r}")
    body = _want(doc, "body", bytes)
    checksum = _want(doc, "sha256", bytes)
    if hashlib.sha256(body).digest() != checksum:
        raise ManifestError("manifest body does not match its sha256 checksum")
    sigs = _want(doc, "sigs", list)
    if len(sigs) > MAX_SIGNATURES:
        raise ManifestError(f"manifest has {len(sigs)} signatures, over the limit of {MAX_SIGNATURES}")
    signatures = []
    for item in sigs:
        if not (isinstance(item, list) and len(item) == 2):
            raise ManifestError("signature entry is not [key name, signature]")
        name, sig = item
        if not (isinstance(name, str) and 0 < len(name.encode()) <= MAX_KEY_NAME_BYTES):
            raise ManifestError("signature key name is not a non-empty string of at most 128 bytes")
        if not (isinstance(sig, bytes) and len(sig) == SIGNATURE_BYTES):
            raise ManifestError(f"signature is not {SIGNATURE_BYTES} bytes")
        signatures.append((name, sig))
    return Envelope(format=FORMAT_VERSION, body=body, signatures=tuple(signatures), checksum=checksum)


def _unpack_body(raw: bytes) -> dict[str, Any]:
    return _unpack_map(raw, "manifest body", max_bin_len=MAX_INLINE_BYTES)


def _unpack_map(raw: bytes, what: str, *, max_bin_len: int) -> dict[str, Any]:
    """A msgpack map decoded within the format's limits, or ManifestError (never an allocation past them)."""
    try:
        doc = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_bin_len,
            max_str_len=1 << 20,
            max_array_len=MAX_CHUNKS,
            max_map_len=4096,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ManifestError(f"{what} is not valid msgpack: {exc}") from exc
    if not isinstance(doc, dict):
        raise ManifestError(f"{what} is not a map")
    return doc


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

    def body_bytes(self) -> bytes:
        """The msgpack map of this manifest's fields: what the envelope's checksum and signatures cover."""
        doc: dict[str, Any] = {
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

    def to_bytes(self, signatures: list[tuple[str, bytes]] | None = None) -> bytes:
        """The manifest object (format 2 envelope), with the given signatures of ``signed_message(body)``."""
        return encode_envelope(self.body_bytes(), signatures or ())

    @classmethod
    def from_bytes(cls, raw: bytes, *, max_size: int) -> Manifest:
        """Parse and validate, checking the checksum but no signature (readers that trust keys use
        decode_envelope, check the signatures, then from_envelope). ``max_size`` bounds the blob size a reader
        will accept (decompression bombs)."""
        return cls.from_envelope(decode_envelope(raw), max_size=max_size)

    @classmethod
    def from_envelope(cls, envelope: Envelope, *, max_size: int) -> Manifest:
        if envelope.body is None:
            assert envelope.legacy_doc is not None
            return _parse_fields(envelope.legacy_doc, max_size)
        return _parse_fields(_unpack_body(envelope.body), max_size)


def _want(doc: dict[str, Any], name: str, typ: type) -> Any:
    value = doc.get(name)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ManifestError(f"manifest field {name!r} is missing or has the wrong type")
    return value


def _parse_fields(doc: dict[str, Any], max_size: int) -> Manifest:
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
