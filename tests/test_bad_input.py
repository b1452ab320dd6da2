"""Bad input from the bucket or the caller gets a typed error (a CastoreError), never another exception or a
huge allocation."""

from __future__ import annotations

import hashlib
import math
import os
import tracemalloc
from pathlib import Path

import msgpack
import pytest

from castore.backends.memory import MemoryBackend
from castore.errors import InvalidKeyError, ManifestError
from castore.format import keys
from castore.format.manifest import Manifest, decode_envelope, encode_envelope
from castore.store import Store

NS = "bad"


def _doc(store: Store, key: str) -> dict:
    """The fields of a stored manifest (the body of its envelope), to edit and re-pack with _pack."""
    return msgpack.unpackb(decode_envelope(store.backend.get(keys.manifest_path(NS, key))).body, raw=False)


def _pack(doc: dict) -> bytes:
    """A manifest object of these fields, with a checksum that matches them (so the fields themselves are tried)."""
    return encode_envelope(msgpack.packb(doc, use_bin_type=True))


def _chunked(store: Store) -> dict:
    store.put(NS, "k", os.urandom(300_000))
    return _doc(store, "k")


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1 << 62, -1, 0, 1.5, "64k", True, None])
@pytest.mark.parametrize("field", ["min", "avg", "max"])
def test_bad_chunker_parameters_are_manifest_errors(field: str, value: object) -> None:
    doc = _chunked(Store(MemoryBackend()))
    if "chunker" not in doc:
        pytest.skip("manifest has no chunker")
    doc["chunker"][field] = value
    with pytest.raises(ManifestError):
        Manifest.from_bytes(_pack(doc), max_size=1 << 40)


@pytest.mark.parametrize("created", [math.inf, -math.inf, math.nan, 1e300, -1.0, "yesterday", True])
def test_bad_created_is_a_manifest_error(created: object) -> None:
    store = Store(MemoryBackend())
    store.put(NS, "k", b"x")
    doc = _doc(store, "k")
    doc["created"] = created
    with pytest.raises(ManifestError):
        Manifest.from_bytes(_pack(doc), max_size=1 << 40)


@pytest.mark.parametrize("n", [251, 255, 256, 300, 512])
def test_keys_a_file_system_cannot_hold_are_rejected(n: int, tmp_path: Path) -> None:
    store = Store(MemoryBackend())
    with pytest.raises(InvalidKeyError):
        store.put(NS, "k" * n, b"x")
    assert keys.validate_key("k" * 250)
    Path(tmp_path / ("k" * 250)).write_bytes(b"a file system holds it")


def test_torch_keys_still_fit() -> None:
    from castore.torch.session import castore_key

    long_key = "pt2:fx-graph-v1::" + "f" * 400
    assert keys.validate_key(castore_key(long_key))
    assert castore_key("pt2:fx-graph-v1::fabc:c1") == "pt2:fx-graph-v1::fabc:c1"


def test_a_small_manifest_declaring_48_gib_allocates_nothing_of_that_size(tmp_path: Path) -> None:
    store = Store(MemoryBackend(), workers=4)
    chunk = 16 << 20
    n = (48 << 30) // chunk
    doc = {
        "format": 1, "kind": "blob", "ns": NS, "key": "huge", "size": n * chunk, "digest": bytes(32), "created": 0.0,
        "writer": "x", "meta": {}, "chunker": {"algo": "fastcdc2020", "min": 1 << 20, "avg": 4 << 20, "max": 8 << 20},
        "chunks": [[hashlib.sha256(b"%d" % i).digest(), chunk, chunk + 4, "raw"] for i in range(n)],
    }
    raw = msgpack.packb(doc, use_bin_type=True)
    assert len(raw) < 1 << 20
    store.backend.put(keys.manifest_path(NS, "huge"), raw)
    tracemalloc.start()
    try:
        assert store.get(NS, "huge") is None
        assert store.get_file(NS, "huge", tmp_path / "out") is False
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20
    assert not (tmp_path / "out").exists()


def test_get_file_streams_without_holding_the_blob(tmp_path: Path) -> None:
    store = Store(MemoryBackend(), workers=2)
    data = os.urandom(24 << 20)
    store.put(NS, "big", data)
    tracemalloc.start()
    try:
        assert store.get_file(NS, "big", tmp_path / "out")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (tmp_path / "out").read_bytes() == data
    assert peak < len(data) // 2  # a window of chunks, not the blob
