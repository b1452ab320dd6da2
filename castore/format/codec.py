"""Chunk objects: a 4-byte header naming the codec, then the payload (docs/FORMAT.md, 'Chunk objects')."""

from __future__ import annotations

import hashlib
import io
import threading

import zstandard

from castore.errors import CorruptChunkError, UnsupportedFormatVersion

MAGIC = b"CAS"
CODEC_RAW = "raw"
CODEC_ZSTD = "zstd"
_CODEC_BYTE = {CODEC_RAW: 0, CODEC_ZSTD: 1}
_BYTE_CODEC = {v: k for k, v in _CODEC_BYTE.items()}
HEADER_SIZE = 4
ZSTD_LEVEL = 3

_local = threading.local()


def _cctx() -> zstandard.ZstdCompressor:
    # Compressor objects are not thread-safe; one per thread keeps encode lock-free.
    c = getattr(_local, "cctx", None)
    if c is None:
        c = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return c


def _dctx() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def sha256(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def encode_chunk(data: bytes | memoryview) -> tuple[bytes, str]:
    """Return (object bytes, codec). zstd is kept only when it makes the payload smaller."""
    compressed = _cctx().compress(data)
    if len(compressed) < len(data):
        return MAGIC + bytes([_CODEC_BYTE[CODEC_ZSTD]]) + compressed, CODEC_ZSTD
    return MAGIC + bytes([_CODEC_BYTE[CODEC_RAW]]) + bytes(data), CODEC_RAW


def codec_of(obj: bytes) -> str:
    if len(obj) < HEADER_SIZE or obj[:3] != MAGIC:
        raise CorruptChunkError("chunk object has no castore header")
    codec = _BYTE_CODEC.get(obj[3])
    if codec is None:
        raise UnsupportedFormatVersion(f"chunk codec byte {obj[3]}", 1)
    return codec


def decompress_at_most(codec: str, payload: bytes | memoryview, limit: int) -> bytes:
    """Decode a payload, allocating at most limit + 1 bytes; raises CorruptChunkError if it decodes past limit."""
    if codec == CODEC_RAW:
        out = bytes(payload)
    elif codec == CODEC_ZSTD:
        try:
            reader = _dctx().stream_reader(io.BytesIO(payload), read_across_frames=False)
            parts = []
            remaining = limit + 1
            while remaining > 0:
                block = reader.read(remaining)
                if not block:
                    break
                parts.append(block)
                remaining -= len(block)
        except zstandard.ZstdError as exc:
            raise CorruptChunkError(f"zstd payload does not decode: {exc}") from exc
        out = b"".join(parts)
    else:
        raise UnsupportedFormatVersion(f"codec {codec!r}", 1)
    if len(out) > limit:
        raise CorruptChunkError(f"chunk decodes to more than {limit} bytes")
    return out


def decompress(codec: str, payload: bytes | memoryview, size: int) -> bytes:
    """Decode a payload to exactly ``size`` bytes, never allocating more than size + 1 (decompression bombs)."""
    if codec == CODEC_RAW and len(payload) != size:
        raise CorruptChunkError(f"raw chunk has {len(payload)} bytes, expected {size}")
    out = decompress_at_most(codec, payload, size)
    if len(out) != size:
        raise CorruptChunkError(f"chunk decodes to {len(out)} bytes, expected {size}")
    return out


def decode_chunk(obj: bytes, digest: bytes, size: int) -> bytes:
    """Decode and verify a chunk object. Raises CorruptChunkError unless sha256(result) == digest."""
    codec = codec_of(obj)
    data = decompress(codec, memoryview(obj)[HEADER_SIZE:], size)
    if sha256(data) != digest:
        raise CorruptChunkError(f"chunk {digest.hex()[:16]}… does not match its digest")
    return data
