"""castore's Triton CacheManager: Triton's file cache, read through from the bucket (no Triton needed: the
manager is driven exactly as triton.compiler.compile and compile_module_from_src drive it)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

import castore.torch as castore_torch
from castore.config import load_config
from castore.torch import triton_cache
from castore.torch.compile_activity import WriteGate, _held_while, tuning_in_this_thread
from castore.torch.session import StoreSession
from castore.torch.triton_cache import CastoreTritonCacheManager, decode_group, encode_group, store_key

KEY = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567ABCDEFGHIJKLMNOPQRST"  # Triton's base32 cache key shape


class Machine:
    """One node: its own castore local layer and its own TRITON_CACHE_DIR, sharing the bucket at url."""

    def __init__(self, root: Path, url: str) -> None:
        self.triton_dir = root / "triton"
        config = load_config({"url": url, "cache_dir": str(root / "castore")}, env={})
        self.session = StoreSession(config, "torch-test")

    def activate(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("TRITON_CACHE_DIR", str(self.triton_dir))
        monkeypatch.setitem(castore_torch._active, "session", self.session)


def compile_like_triton(manager: CastoreTritonCacheManager, name: str, cubin: bytes) -> dict[str, str]:
    """What triton.compiler.compile does on a cache miss: put each stage's file, then the group."""
    group = {
        f"{name}.ttir": manager.put("module { tt.func }", f"{name}.ttir", binary=False),
        f"{name}.cubin": manager.put(cubin, f"{name}.cubin"),
        f"{name}.json": manager.put('{"name": "%s", "num_warps": 4}' % name, f"{name}.json", binary=False),
    }
    manager.put_group(f"{name}.json", group)
    return group


def test_a_fresh_machine_gets_a_compiled_kernel_group_from_the_bucket(tmp_path: Path, s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = Machine(tmp_path / "a", s3_url), Machine(tmp_path / "b", s3_url)
    a.activate(monkeypatch)
    manager = CastoreTritonCacheManager(KEY)
    assert manager.get_group("triton_poi_0.json") is None  # cold: Triton compiles
    compile_like_triton(manager, "triton_poi_0", b"\x7fELF cubin" * 500)
    assert a.session.flush(30)
    assert a.session.stats.caches["triton"].puts == 1

    b.activate(monkeypatch)
    fresh = CastoreTritonCacheManager(KEY)
    group = fresh.get_group("triton_poi_0.json")
    assert group is not None and sorted(group) == ["triton_poi_0.cubin", "triton_poi_0.json", "triton_poi_0.ttir"]
    for name, path in group.items():
        assert path.startswith(str(b.triton_dir) + os.sep), "paths are this machine's, not the writer's"
    assert Path(group["triton_poi_0.cubin"]).read_bytes() == b"\x7fELF cubin" * 500
    assert b.session.stats.caches["triton"].hits == 1
    # The group is now in this node's Triton dir: the next process does not ask the store.
    again = CastoreTritonCacheManager(KEY).get_group("triton_poi_0.json")
    assert again == group
    assert b.session.stats.caches["triton"].hits == 1


def test_the_configs_a_kernel_tunes_over_are_not_asked_of_the_store(tmp_path: Path, s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel is tuned only when its autotune result was not found: the candidates it compiles meanwhile are
    compiled, not looked up (a round trip each); the same kernel compiled outside tuning is fetched."""
    a, b = Machine(tmp_path / "a", s3_url), Machine(tmp_path / "b", s3_url)
    a.activate(monkeypatch)
    compile_like_triton(CastoreTritonCacheManager(KEY), "triton_red_0", b"\x7fELF cubin" * 100)
    assert a.session.flush(30)

    b.activate(monkeypatch)
    looked_up: list[object] = []

    def coordinate_descent_tuning(self: object) -> None:  # what tuning does: compile a candidate config
        looked_up.append(CastoreTritonCacheManager(KEY).get_group("triton_red_0.json"))

    tune = _held_while(WriteGate(), coordinate_descent_tuning)
    tune(object())
    assert looked_up == [None]
    counts = b.session.stats.caches.get("triton")
    assert counts is None or counts.hits + counts.misses == 0, "no store request while tuning"
    assert not tuning_in_this_thread()
    assert CastoreTritonCacheManager(KEY).get_group("triton_red_0.json") is not None  # outside tuning: fetched
    assert b.session.stats.caches["triton"].hits == 1


def test_triton_launcher_so_is_shared_but_stage_files_are_not_sent_alone(tmp_path: Path, s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = Machine(tmp_path / "a", s3_url), Machine(tmp_path / "b", s3_url)
    a.activate(monkeypatch)
    manager = CastoreTritonCacheManager(KEY)
    assert manager.get_file("cuda_utils.cpython-311-x86_64-linux-gnu.so") is None
    manager.put(b"\x7fELF launcher", "cuda_utils.cpython-311-x86_64-linux-gnu.so", binary=True)
    manager.put("ir", "k.ttgir", binary=False)  # a stage file: uploaded only as part of its group
    assert a.session.flush(30)
    assert a.session.stats.caches["triton"].puts == 1

    b.activate(monkeypatch)
    fresh = CastoreTritonCacheManager(KEY)
    path = fresh.get_file("cuda_utils.cpython-311-x86_64-linux-gnu.so")
    assert path is not None and Path(path).read_bytes() == b"\x7fELF launcher"
    assert fresh.get_file("k.ttgir") is None


def test_dump_and_override_dirs_never_touch_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = Machine(tmp_path / "a", f"file://{tmp_path}/bucket")
    a.activate(monkeypatch)
    monkeypatch.setenv("TRITON_DUMP_DIR", str(tmp_path / "dump"))
    dump = CastoreTritonCacheManager(KEY, dump=True)
    compile_like_triton(dump, "k", b"cubin")
    assert dump.get_group("nothing.json") is None
    assert a.session.flush(30)
    assert a.session.stats.caches["triton"].puts == 0
    assert a.session.stats.caches["triton"].misses == 0
    assert (tmp_path / "dump" / KEY / "__grp__k.json").exists()


def test_without_a_session_it_is_triton_s_plain_file_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.delitem(castore_torch._active, "session", raising=False)
    manager = CastoreTritonCacheManager(KEY)
    assert manager.get_group("k.json") is None
    group = compile_like_triton(manager, "k", b"cubin")
    assert CastoreTritonCacheManager(KEY).get_group("k.json") == group


@pytest.mark.parametrize(
    "blob",
    [
        b"not msgpack \xc1",
        encode_group({}),
        encode_group({"../escape.so": b"x"}),
        encode_group({"sub/dir.cubin": b"x"}),
        triton_cache.msgpack.packb({"v": 2, "files": {"k.json": b"{}"}}),
    ],
    ids=["garbage", "empty", "dotdot", "slash", "newer-version"],
)
def test_a_malformed_or_hostile_group_is_a_miss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, blob: bytes) -> None:
    assert decode_group(blob) is None
    a = Machine(tmp_path / "a", f"file://{tmp_path}/bucket")
    a.activate(monkeypatch)
    a.session.put("triton", store_key(KEY, "k.json"), blob)
    assert a.session.flush(30)
    with caplog.at_level(logging.WARNING, logger="castore.torch"):
        assert CastoreTritonCacheManager(KEY).get_group("k.json") is None
    assert "malformed Triton cache entry" in caplog.text
    assert not (tmp_path / "escape.so").exists() and not (a.triton_dir / "escape.so").exists()


def test_an_unreachable_store_is_a_plain_miss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    url = "s3://bucket/p?endpoint=http://127.0.0.1:9"  # a closed port on loopback: refused at once
    config = load_config({"url": url, "cache_dir": str(tmp_path / "c"), "connect_timeout": 1, "max_attempts": 1}, env={})
    session = StoreSession(config, "torch-test")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.setitem(castore_torch._active, "session", session)
    manager = CastoreTritonCacheManager(KEY)
    assert manager.get_group("k.json") is None
    compile_like_triton(manager, "k", b"cubin")  # the compile goes on, locally
    assert CastoreTritonCacheManager(KEY).get_group("k.json") is not None
    counters = session.stats.caches["triton"]
    assert counters.get_errors == 1 and counters.hits == 0
