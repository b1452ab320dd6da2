"""The on-bucket format: chunking, chunk codecs, manifests, keys."""

from __future__ import annotations

import hashlib
import os
import random
import tracemalloc

import msgpack
import pytest
import zstandard

from castore.errors import CorruptChunkError, InvalidKeyError, ManifestError, UnsupportedFormatVersion
from castore.format import chunking, keys
from castore.format import codec as codecs
from castore.format.manifest import FORMAT_VERSION, MAX_MANIFEST_BYTES, ChunkRef, Manifest, TreeEntry


def _random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# -- chunking ---------------------------------------------------------------------------------------------
def test_chunks_concatenate_to_input_and_respect_bounds() -> None:
    data = _random_bytes(4 << 20, seed=1)
    params = chunking.SMALL
    pieces = [bytes(p) for p in chunking.cut(data, params)]
    assert b"".join(pieces) == data
    assert len(pieces) > 10
    assert all(len(p) <= params.max_size for p in pieces)
    assert all(len(p) >= params.min_size for p in pieces[:-1])  # only the last may be short
    mean = len(data) / len(pieces)
    assert params.min_size < mean < 2 * params.avg_size


def test_chunking_is_deterministic() -> None:
    data = _random_bytes(1 << 20, seed=2)
    first = [bytes(p) for p in chunking.cut(data)]
    second = [bytes(p) for p in chunking.cut(bytes(data))]
    assert first == second


def test_small_and_empty_inputs() -> None:
    assert list(chunking.cut(b"")) == []
    assert [bytes(p) for p in chunking.cut(b"abc")] == [b"abc"]
    exact = b"x" * chunking.SMALL.min_size
    assert [bytes(p) for p in chunking.cut(exact)] == [exact]


def test_one_byte_insert_changes_only_a_few_chunks() -> None:
    data = _random_bytes(4 << 20, seed=3)
    mid = len(data) // 2
    edited = data[:mid] + b"!" + data[mid:]
    before = {hashlib.sha256(p).digest(): len(p) for p in chunking.cut(data, chunking.SMALL)}
    after = [(hashlib.sha256(p).digest(), len(p)) for p in chunking.cut(edited, chunking.SMALL)]
    shared = sum(n for d, n in after if d in before)
    dedup = shared / len(edited)
    assert dedup > 0.80, f"only {dedup:.1%} of the edited blob reuses old chunks"
    changed = sum(1 for d, _ in after if d not in before)
    assert changed <= 3


def test_params_for_size_picks_large_chunks_for_large_blobs() -> None:
    assert chunking.params_for_size((1 << 20) - 1) == chunking.SMALL
    assert chunking.params_for_size(1 << 20) == chunking.MEDIUM
    assert chunking.params_for_size(chunking.LARGE_BLOB_THRESHOLD - 1) == chunking.MEDIUM
    assert chunking.params_for_size(chunking.LARGE_BLOB_THRESHOLD) == chunking.LARGE


# -- codec ------------------------------------------------------------------------------------------------
def test_codec_round_trip_compressible() -> None:
    data = b"torch.compile " * 5000
    obj, codec = codecs.encode_chunk(data)
    assert codec == codecs.CODEC_ZSTD
    assert len(obj) < len(data) // 10
    assert codecs.codec_of(obj) == codecs.CODEC_ZSTD
    assert codecs.decode_chunk(obj, hashlib.sha256(data).digest(), len(data)) == data


def test_codec_raw_fallback_on_incompressible_data() -> None:
    data = os.urandom(64 << 10)
    obj, codec = codecs.encode_chunk(data)
    assert codec == codecs.CODEC_RAW
    assert len(obj) == len(data) + codecs.HEADER_SIZE
    assert codecs.decode_chunk(obj, hashlib.sha256(data).digest(), len(data)) == data


def test_decode_rejects_wrong_digest_size_header_and_codec() -> None:
    data = b"hello world" * 100
    digest = hashlib.sha256(data).digest()
    obj, _ = codecs.encode_chunk(data)
    with pytest.raises(CorruptChunkError):
        codecs.decode_chunk(obj, hashlib.sha256(b"other").digest(), len(data))
    with pytest.raises(CorruptChunkError):
        codecs.decode_chunk(obj, digest, len(data) - 1)
    with pytest.raises(CorruptChunkError):
        codecs.decode_chunk(b"XYZ" + obj[3:], digest, len(data))
    with pytest.raises(UnsupportedFormatVersion):
        codecs.decode_chunk(obj[:3] + b"\x09" + obj[4:], digest, len(data))
    flipped = bytearray(obj)
    flipped[len(flipped) // 2] ^= 0xFF
    with pytest.raises(CorruptChunkError):
        codecs.decode_chunk(bytes(flipped), digest, len(data))
    raw, codec = codecs.encode_chunk(os.urandom(100))
    assert codec == codecs.CODEC_RAW
    with pytest.raises(CorruptChunkError):
        codecs.decode_chunk(raw + b"x", hashlib.sha256(raw[4:]).digest(), 100)


def test_decompression_bomb_is_bounded() -> None:
    # A zstd payload that expands to 100 MB, in a chunk that declares 64 KiB. Built by streaming so the
    # test itself never holds 100 MB either.
    cobj = zstandard.ZstdCompressor(level=1).compressobj(size=100 * 1000 * 1000)
    block = bytes(1 << 20)
    parts = []
    written = 0
    while written < 100 * 1000 * 1000:
        n = min(len(block), 100 * 1000 * 1000 - written)
        parts.append(cobj.compress(block[:n]))
        written += n
    parts.append(cobj.flush())
    payload = b"".join(parts)
    assert len(payload) < 1 << 20
    obj = codecs.MAGIC + b"\x01" + payload
    declared = 64 << 10
    tracemalloc.start()
    try:
        with pytest.raises(CorruptChunkError):
            codecs.decode_chunk(obj, hashlib.sha256(bytes(declared)).digest(), declared)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"decoding a bomb allocated {peak} bytes"


# -- manifests --------------------------------------------------------------------------------------------
def _chunked_manifest() -> Manifest:
    refs = [ChunkRef(hashlib.sha256(bytes([i])).digest(), 1000 + i, 500 + i, codecs.CODEC_ZSTD) for i in range(3)]
    return Manifest(
        namespace="ns",
        key="k:1",
        size=sum(r.size for r in refs),
        digest=hashlib.sha256(b"blob").digest(),
        chunks=refs,
        chunker=chunking.SMALL,
        meta={"filename": "a.bin", "mode": 0o644, "flag": True, "ratio": 1.5, "none": None},
        writer="test",
    )


def test_manifest_round_trip_chunked() -> None:
    m = _chunked_manifest()
    back = Manifest.from_bytes(m.to_bytes(), max_size=1 << 30)
    assert back == m
    assert back.stored_size == sum(c.stored_size for c in m.chunks)


def test_manifest_round_trip_inline_tree_with_refs() -> None:
    content = b"abcdef"
    inline, _ = codecs.encode_chunk(content)
    m = Manifest(
        namespace="ns",
        key="tree",
        size=len(content),
        digest=hashlib.sha256(content).digest(),
        kind="tree",
        inline=inline,
        files=[TreeEntry("d", "d", 0o755, 0), TreeEntry("d/a", "f", 0o600, 2), TreeEntry("d/b", "f", 0o755, 4)],
        refs=[("other", "key")],
    )
    back = Manifest.from_bytes(m.to_bytes(), max_size=1 << 20)
    assert back == m
    assert back.stored_size == len(inline)


def _doc(m: Manifest) -> dict:
    """The manifest's fields, with the envelope's format version beside them (see _pack)."""
    envelope = msgpack.unpackb(m.to_bytes(), raw=False)
    return {"format": envelope["format"], **msgpack.unpackb(envelope["body"], raw=False)}


def _pack(doc: dict) -> bytes:
    """A manifest object whose body is doc (less its 'format', which goes on the envelope), checksum correct."""
    doc = dict(doc)
    body = msgpack.packb({k: v for k, v in doc.items() if k != "format"}, use_bin_type=True)
    envelope = {"body": body, "sha256": hashlib.sha256(body).digest(), "sigs": []}
    if "format" in doc:
        envelope["format"] = doc["format"]
    return msgpack.packb(envelope, use_bin_type=True)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(size=d["size"] + 1),  # lying size: chunks add up to less
        lambda d: d["chunks"][0].__setitem__(1, d["chunks"][0][1] + 7),  # lying chunk size
        lambda d: d["chunks"][0].__setitem__(0, b"short"),
        lambda d: d["chunks"][0].__setitem__(3, "lz4"),
        lambda d: d["chunks"][0].__setitem__(1, 0),
        lambda d: d["chunks"].append([b"x" * 32, 10]),
        lambda d: d.update(kind="symlink"),
        lambda d: d.update(digest=b"x" * 31),
        lambda d: d.pop("key"),
        lambda d: d.update(size="12"),
        lambda d: d.update(size=True),
        lambda d: d.update(meta=[1, 2]),
        lambda d: d.update(format=0),
        lambda d: d.update(format="1"),
        lambda d: d.pop("format"),
        lambda d: d.update(chunker="fast"),
        lambda d: d.update(refs=[["only-one"]]),
        lambda d: d.update(kind="tree", files=[["a", "f", 0o644, 1]]),  # files add up to 1, blob is larger
    ],
)
def test_malformed_manifests_raise_manifest_error(mutate) -> None:  # noqa: ANN001
    doc = _doc(_chunked_manifest())
    mutate(doc)
    with pytest.raises(ManifestError):
        Manifest.from_bytes(_pack(doc), max_size=1 << 30)


@pytest.mark.parametrize("raw", [b"", b"\xc1", b"not msgpack at all \xff\xfe", msgpack.packb([1, 2, 3]), msgpack.packb("str")])
def test_garbage_is_a_manifest_error(raw: bytes) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_bytes(raw, max_size=1 << 30)


def test_unknown_future_version_is_unsupported() -> None:
    doc = _doc(_chunked_manifest())
    doc["format"] = FORMAT_VERSION + 1
    with pytest.raises(UnsupportedFormatVersion) as info:
        Manifest.from_bytes(_pack(doc), max_size=1 << 30)
    assert info.value.found == FORMAT_VERSION + 1


def test_oversized_manifest_and_oversized_blob_are_rejected() -> None:
    with pytest.raises(ManifestError):
        Manifest.from_bytes(b"\x00" * (MAX_MANIFEST_BYTES + 1), max_size=1 << 30)
    m = _chunked_manifest()
    with pytest.raises(ManifestError):
        Manifest.from_bytes(m.to_bytes(), max_size=m.size - 1)


def test_tree_entry_paths_escaping_destination_are_rejected() -> None:
    from castore.errors import FormatError
    from castore.format.tree import safe_relpath

    for bad in ("../x", "/etc/passwd", "a/../../b", "", "a//b", "a\x00b"):
        with pytest.raises(FormatError):
            safe_relpath(bad)
    assert str(safe_relpath("a/b/c")) == "a/b/c"


# -- keys -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["..", "a/b", "/abs", "a\x00b", "x" * 10_000, "", "a\\b", ".hidden", "a..b", "sp ace", 5])
def test_invalid_keys(bad: object) -> None:
    with pytest.raises(InvalidKeyError):
        keys.validate_key(bad)
    with pytest.raises(InvalidKeyError):
        keys.manifest_path("ns", bad)  # type: ignore[arg-type]


def test_valid_keys_and_paths() -> None:
    key = "pt2:fx-graph-v1::fabc123=+@,_.x"
    assert keys.validate_key(key) == key
    assert keys.manifest_path("ns", key) == f"castore/v1/manifests/ns/{key}"
    digest = hashlib.sha256(b"x").digest()
    path = keys.chunk_path(digest)
    assert path == f"castore/v1/chunks/{digest.hex()[:2]}/{digest.hex()}"
    assert keys.parse_chunk_path(path) == digest
    assert keys.parse_chunk_path("castore/v1/chunks/ab/zz") is None
    with pytest.raises(InvalidKeyError):
        keys.validate_namespace("a:b")


@pytest.mark.parametrize("version", [True, 2.0, 1.0, -1, None, b"\x02"])
def test_format_version_must_be_an_integer_one_or_two(version: object) -> None:
    doc = _doc(_chunked_manifest())
    doc["format"] = version
    with pytest.raises(ManifestError):
        Manifest.from_bytes(_pack(doc), max_size=1 << 30)


def test_legacy_format_1_manifests_are_still_read() -> None:
    m = _chunked_manifest()
    legacy = {"format": 1, **msgpack.unpackb(m.body_bytes(), raw=False)}
    assert Manifest.from_bytes(_pack_legacy(legacy), max_size=1 << 30) == m
    legacy["size"] += 1  # version 1 rules still apply to the fields
    with pytest.raises(ManifestError):
        Manifest.from_bytes(_pack_legacy(legacy), max_size=1 << 30)


def _pack_legacy(doc: dict) -> bytes:
    return msgpack.packb(doc, use_bin_type=True)


def test_envelope_fields_are_checked_before_the_body() -> None:
    from castore.format.manifest import decode_envelope, encode_envelope

    body = _chunked_manifest().body_bytes()
    good = msgpack.unpackb(encode_envelope(body, [("ci", b"s" * 64)]), raw=False)
    for mutate in (
        lambda d: d.update(sha256=hashlib.sha256(b"other").digest()),
        lambda d: d.pop("sha256"),
        lambda d: d.pop("sigs"),
        lambda d: d.update(sigs=[["ci", b"short"]]),
        lambda d: d.update(sigs=[["", b"s" * 64]]),
        lambda d: d.update(sigs=[["ci", b"s" * 64]] * 9),
        lambda d: d.update(body="not bin"),
    ):
        doc = dict(good)
        mutate(doc)
        with pytest.raises(ManifestError):
            decode_envelope(msgpack.packb(doc, use_bin_type=True))
    assert decode_envelope(msgpack.packb(good, use_bin_type=True)).signatures == (("ci", b"s" * 64),)
