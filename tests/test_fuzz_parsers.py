"""Hypothesis fuzzing of every parser of outside input: manifests, trees, keys and namespaces, config files,
fetch plans. Typed errors (CastoreError) only, never another exception type. CASTORE_TRIALS_SCALE multiplies
the number of examples."""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from castore.backends.memory import MemoryBackend
from castore.errors import CastoreError
from castore.format import keys
from castore.format.manifest import Manifest, TreeEntry
from castore.format.tree import checked_entries, path_parts
from castore.store import Store

SCALE = float(os.environ.get("CASTORE_TRIALS_SCALE", "1"))
TALLY: Counter[str] = Counter()


def _tally(outcome: str) -> None:
    TALLY["examples"] += 1
    TALLY[outcome] += 1


def _run(name: str, fuzz) -> None:  # noqa: ANN001 - a hypothesis-wrapped function
    """Run one fuzz target and print its one-line summary (pytest -s); any non-CastoreError fails the target."""
    TALLY.clear()
    fuzz()
    rejected = "read as an empty plan" if name == "fetch plans" else "rejected with a typed error"
    print(f"\nfuzz {name}: {TALLY['examples']} examples, {TALLY['accepted']} accepted, {TALLY['typed']} {rejected}, "
          "0 other exceptions")
FUZZ = settings(max_examples=max(1, int(300 * SCALE)), deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])


def _real_manifests() -> list[bytes]:
    store = Store(MemoryBackend())
    rnd = random.Random(1)
    store.put("ns", "inline", b"small entry", meta={"filename": "a.bin", "mode": 0o644})
    store.put("ns", "chunked", rnd.randbytes(200_000))
    tree = Path(os.environ.get("TMPDIR", "/tmp")) / f"castore-fuzz-tree-{os.getpid()}"
    (tree / "d").mkdir(parents=True, exist_ok=True)
    (tree / "d" / "f").write_bytes(b"file")
    (tree / "g").write_bytes(rnd.randbytes(30_000))
    store.put_tree("ns", "tree", tree)
    return [store.backend.get(keys.manifest_path("ns", k)) for k in ("inline", "chunked", "tree")]


REAL = _real_manifests()
_WIRE = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats(allow_nan=True)
    | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
FIELDS = ["format", "kind", "ns", "key", "size", "digest", "created", "writer", "meta", "inline", "chunker", "chunks",
          "files", "refs", "min", "avg", "max", "algo"]


def _consume(m: Manifest) -> None:
    """What readers do with a parsed manifest: the CLI summary and the tree checks must stay typed too."""
    from castore.cli.store_cmds import manifest_summary

    manifest_summary(m)
    if m.kind == "tree":
        try:
            checked_entries(m.files)
        except CastoreError:
            pass


def _parse(raw: bytes) -> None:
    try:
        m = Manifest.from_bytes(raw, max_size=1 << 40)
    except CastoreError:
        _tally("typed")
        return
    _consume(m)
    _tally("accepted")


@FUZZ
@given(st.binary(max_size=400))
def _fuzz_manifest_parser_on_random_bytes(raw: bytes) -> None:
    _parse(raw)


@FUZZ
@given(st.sampled_from(range(len(REAL))), st.lists(st.tuples(st.sampled_from(["flip", "set", "cut", "insert", "delete"]),
                                                             st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=4))
def _fuzz_manifest_parser_on_mutated_real_manifests(which: int, edits: list[tuple[str, int, int]]) -> None:
    raw = bytearray(REAL[which])
    for op, pos, value in edits:
        if not raw:
            break
        i = pos % len(raw)
        if op == "flip":
            raw[i] ^= 1 << (value % 8)
        elif op == "set":
            raw[i] = value
        elif op == "cut":
            del raw[i:]
        elif op == "insert":
            raw.insert(i, value)
        else:
            del raw[i]
    _parse(bytes(raw))


@FUZZ
@given(st.sampled_from(range(len(REAL))), st.lists(st.tuples(st.sampled_from(FIELDS), _WIRE), min_size=1, max_size=4),
       st.sampled_from([None, "chunker", "meta"]))
def _fuzz_manifest_parser_on_real_manifests_with_fields_replaced(which: int, changes: list, nested: str | None) -> None:
    doc = msgpack.unpackb(REAL[which], raw=False)
    target = doc.get(nested) if nested and isinstance(doc.get(nested), dict) else doc
    for name, value in changes:
        target[name] = value
    try:
        raw = msgpack.packb(doc, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return
    _parse(raw)


@FUZZ
@given(st.lists(st.tuples(st.text(max_size=30), st.sampled_from(["f", "d", "l", ""]), st.integers(-1, 1 << 20),
                          st.integers(0, 100)), max_size=8))
def _fuzz_tree_checks_on_random_entries(items: list) -> None:
    entries = [TreeEntry(*item) for item in items]
    try:
        checked = checked_entries(entries)
    except CastoreError:
        _tally("typed")
        return
    _tally("accepted")
    for entry, parts in checked:
        assert all(p not in ("", ".", "..") and "\x00" not in p and "/" not in p for p in parts)
        assert not entry.path.startswith("/")


@FUZZ
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def _fuzz_keys_and_namespaces(value: str) -> None:
    for validate in (keys.validate_key, keys.validate_namespace):
        try:
            ok = validate(value)
        except CastoreError:
            _tally("typed")
            continue
        _tally("accepted")
        assert ok == value and len(value.encode()) <= 250
        assert path_parts(value) == (value,)  # a valid name is one safe path component
    try:
        keys.manifest_path(value, value)
    except CastoreError:
        pass


_NAMES = st.sampled_from(["a", "b", "link", ".", "..", "", "a/b", "link/x", "../out", "/abs", "a\x00", "x" * 256, "dir/f"])


@FUZZ
@given(st.lists(st.tuples(st.lists(_NAMES, min_size=1, max_size=3).map("/".join), st.sampled_from(["f", "d"]),
                          st.integers(0, 0o7777), st.binary(max_size=20)), max_size=6))
def _fuzz_extract_tree_into_a_destination_with_a_symlink(items: list) -> None:
    """Whatever the entries, nothing is written outside DEST, nothing through the symlink in it, and no mode is
    unsafe; an entry that cannot be restored safely is a typed error raised before anything is written."""
    import hashlib
    import shutil
    import stat as stat_
    import tempfile

    from castore.store import extract_tree

    sandbox = Path(tempfile.mkdtemp(prefix="castore-fuzz-"))
    try:
        outside, dest = sandbox / "outside", sandbox / "dest"
        outside.mkdir(mode=0o700)
        dest.mkdir()
        (dest / "link").symlink_to(outside)
        blob = b"".join(content for _, typ, _, content in items if typ == "f")
        entries = [TreeEntry(path, typ, mode, len(content) if typ == "f" else 0) for path, typ, mode, content in items]
        m = Manifest(namespace="ns", key="k", size=len(blob), digest=hashlib.sha256(blob).digest(), kind="tree", files=entries)
        try:
            extract_tree(m, blob, dest)
            _tally("accepted")
        except CastoreError:
            _tally("typed")
            assert sorted(p.name for p in dest.iterdir()) == ["link"], "an error after something was written"
        assert list(outside.iterdir()) == [] and stat_.S_IMODE(outside.stat().st_mode) == 0o700
        for p in dest.rglob("*"):
            if not p.is_symlink():
                assert stat_.S_IMODE(p.stat().st_mode) & 0o7022 == 0
    finally:
        shutil.rmtree(sandbox)


_TOML_VALUE = st.one_of(
    st.integers(-(1 << 70), 1 << 70).map(str), st.floats(allow_nan=True).map(lambda f: "nan" if math.isnan(f) else repr(f).replace("inf", "inf")),
    st.text(max_size=20).map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'),
    st.booleans().map(lambda b: str(b).lower()), st.just("[1, 2]"), st.just("{a = 1}"), st.just('"1e999"'), st.just('"-5G"'),
)
_SETTINGS = ["url", "cache_dir", "cache_size", "read_only", "connect_timeout", "read_timeout", "max_attempts", "workers",
             "error_backoff", "slow_request", "store_wait", "flush_timeout", "prefetch", "bogus"]


@pytest.fixture
def config_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    work = tmp_path_factory.mktemp("cfg")
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(work / "xdg"))
    for name in list(os.environ):
        if name.startswith("CASTORE_") and name != "CASTORE_TRIALS_SCALE":
            monkeypatch.delenv(name)
    return work


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(_SETTINGS), _TOML_VALUE), max_size=6) | st.binary(max_size=200))
def _fuzz_config_files(config_dir: Path, content: list | bytes) -> None:
    from castore.config import load_config

    if isinstance(content, bytes):
        (config_dir / "castore.toml").write_bytes(content)
    else:
        (config_dir / "castore.toml").write_text("".join(f"{name} = {value}\n" for name, value in content))
    try:
        load_config()
    except CastoreError:
        _tally("typed")
        return
    _tally("accepted")


@FUZZ
@given(st.binary(max_size=200) | st.recursive(st.none() | st.integers() | st.text(max_size=10),
                                                lambda inner: st.lists(inner, max_size=4)
                                                | st.dictionaries(st.sampled_from(["v", "entries", "x"]), inner, max_size=3),
                                                max_leaves=12).map(lambda doc: __import__("json").dumps(doc).encode())
       | st.integers(1, 100_000).map(lambda n: b"[" * n)
       | st.tuples(st.sampled_from([1, 2, "1", None]), st.lists(st.lists(_WIRE.filter(lambda v: not isinstance(v, bytes)),
                                                                          max_size=3), max_size=6))
       .map(lambda t: __import__("json").dumps({"v": t[0], "entries": t[1]}, default=str).encode()))
def _fuzz_fetch_plans(raw: bytes) -> None:
    from castore.torch.session import decode_plan  # imports no torch

    entries = decode_plan(raw)
    _tally("accepted" if entries else "typed")  # an unreadable plan is an empty one
    assert isinstance(entries, list) and all(isinstance(c, str) and isinstance(k, str) for c, k in entries)


def test_fuzz_fetch_plans() -> None:
    _run("fetch plans", _fuzz_fetch_plans)

def test_fuzz_manifest_parser_on_random_bytes() -> None:
    _run("manifest parser on random bytes", _fuzz_manifest_parser_on_random_bytes)

def test_fuzz_manifest_parser_on_mutated_real_manifests() -> None:
    _run("manifest parser on mutated real manifests", _fuzz_manifest_parser_on_mutated_real_manifests)

def test_fuzz_manifest_parser_on_real_manifests_with_fields_replaced() -> None:
    _run("manifest parser on real manifests with fields replaced", _fuzz_manifest_parser_on_real_manifests_with_fields_replaced)

def test_fuzz_tree_checks_on_random_entries() -> None:
    _run("tree checks on random entries", _fuzz_tree_checks_on_random_entries)

def test_fuzz_keys_and_namespaces() -> None:
    _run("keys and namespaces", _fuzz_keys_and_namespaces)

def test_fuzz_config_files(config_dir: Path) -> None:
    _run("config files", lambda: _fuzz_config_files(config_dir))


def test_fuzz_extract_tree_into_a_destination_with_a_symlink() -> None:
    _run("extract tree into a destination with a symlink", _fuzz_extract_tree_into_a_destination_with_a_symlink)
