"""PyTorch's and Triton's source keys are remembered per machine: a stored value is used while the files it was
computed from are unchanged, computed again (by the original function) when any of them changes, and the cache
API callers rely on (a compile worker's torch_key.set) keeps working."""

from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from castore.torch import source_keys
from castore.torch.import_hooks import Patches

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _tree(root: Path) -> None:
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "a.py").write_text("A = 1\n")
    (root / "pkg" / "sub" / "__init__.py").write_text("")
    (root / "pkg" / "sub" / "b.py").write_text("B = 2\n")
    (root / "pkg" / "data").mkdir()
    (root / "pkg" / "data" / "c.py").write_text("not a package: no __init__\n")
    (root / "pkg" / "__pycache__").mkdir()
    (root / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"bytecode")


def _print(root: Path) -> str:
    return source_keys.fingerprint("k", str(root), source_keys.package_module_files(str(root / "pkg")))


def test_the_module_walk_reads_what_iter_modules_finds(tmp_path: Path) -> None:
    _tree(tmp_path)
    found = sorted(os.path.relpath(p, tmp_path) for p in source_keys.package_module_files(str(tmp_path / "pkg")))
    assert found == ["pkg/__init__.py", "pkg/a.py", "pkg/sub/__init__.py", "pkg/sub/b.py"]


def test_an_edit_that_keeps_size_and_mtime_still_changes_the_fingerprint(tmp_path: Path) -> None:
    _tree(tmp_path)
    before = _print(tmp_path)
    assert _print(tmp_path) == before
    path = tmp_path / "pkg" / "sub" / "b.py"
    st = path.stat()
    path.write_text("B = 3\n")  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same modification time: the change time moves
    assert path.stat().st_mtime_ns == st.st_mtime_ns
    assert _print(tmp_path) != before


def test_a_new_module_and_bytecode_count_as_they_should(tmp_path: Path) -> None:
    _tree(tmp_path)
    before = _print(tmp_path)
    (tmp_path / "pkg" / "__pycache__" / "b.cpython-311.pyc").write_bytes(b"more bytecode")
    assert _print(tmp_path) == before  # compileall on the machine does not change torch's sources
    (tmp_path / "pkg" / "new.py").write_text("N = 1\n")
    assert _print(tmp_path) != before


def test_the_memo_refuses_values_that_are_not_keys(tmp_path: Path) -> None:
    memo = source_keys.KeyMemo(str(tmp_path / "keys"))
    memo.put("k", "f", b"")
    memo.put("k", "g", b"x" * (source_keys.MAX_VALUE_BYTES + 1))
    assert memo.get("k", "f") is None and memo.get("k", "g") is None
    memo.put("k", "h", b"value")
    assert memo.get("k", "h") == b"value"
    (tmp_path / "keys" / "k-big").write_bytes(b"x" * (source_keys.MAX_VALUE_BYTES + 1))
    assert memo.get("k", "big") is None


@pytest.fixture
def key_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A module defining an lru-cached key function (as Triton does) and one that copied it by name."""
    name = f"castore_key_probe_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import functools
        calls = []

        @functools.lru_cache()
        def triton_key():
            calls.append(1)
            return "computed-key"
    """))
    (tmp_path / f"{name}_user.py").write_text(f"from {name} import triton_key\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    module = importlib.import_module(name)
    user = importlib.import_module(f"{name}_user")
    yield module, user
    for mod in (name, f"{name}_user"):
        sys.modules.pop(mod, None)


def test_a_key_is_computed_once_kept_and_then_served_without_computing(tmp_path: Path, key_module) -> None:
    module, user = key_module
    memo = source_keys.KeyMemo(str(tmp_path / "keys"))
    encode, decode = (lambda v: v.encode()), (lambda b: b.decode())
    patches = Patches()
    source_keys._remember(patches, memo, module, "triton_key", lambda: "print1", encode, decode)
    assert user.triton_key is module.triton_key  # the copy made by `from ... import` follows
    assert user.triton_key() == "computed-key" and module.calls == [1]
    assert memo.get("triton_key", "print1") == b"computed-key"
    patches.undo()
    assert user.triton_key.__name__ == "triton_key" and not isinstance(user.triton_key, source_keys.RememberedKey)

    memo.put("triton_key", "print1", b"stored-key")  # another process's value for the same files
    module.triton_key.cache_clear()
    module.calls.clear()
    patches = Patches()
    source_keys._remember(patches, memo, module, "triton_key", lambda: "print1", encode, decode)
    assert user.triton_key() == "stored-key" and module.calls == []
    patches.undo()

    patches = Patches()  # other files: the stored value is not used
    source_keys._remember(patches, memo, module, "triton_key", lambda: "print2", encode, decode)
    assert module.triton_key() == "computed-key" and module.calls == [1]
    patches.undo()


def test_set_and_clear_keep_pytorchs_meaning(tmp_path: Path) -> None:
    calls: list[int] = []

    @functools.lru_cache
    def key() -> bytes:
        calls.append(1)
        return b"own"

    kept: list[bytes] = []
    remembered = source_keys.RememberedKey(key, "torch_key", bytes, kept.append, value=b"stored")
    assert remembered() == b"stored"
    remembered.set(b"parent's")  # a compile worker is handed its parent's key
    assert remembered() == b"parent's"
    remembered.clear()
    assert remembered() == b"own" and calls == [1] and kept == [b"own"]


SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from torch._inductor import codecache
    from torch._inductor.compile_worker import subproc_pool
    import castore.torch
    value = codecache.torch_key()
    print(json.dumps({"value": value.hex(), "kind": type(codecache.torch_key).__name__,
                      "how": castore.torch.stats().get("source_keys", {}).get("torch_key"),
                      "alias": subproc_pool.torch_key is codecache.torch_key,
                      "files": sorted(os.listdir(os.path.join(os.environ["CASTORE_CACHE_DIR"], "source-keys")))}))
""")


@pytest.mark.slow
def test_torch_key_is_remembered_across_processes_and_equals_pytorchs(tmp_path: Path) -> None:
    from castore.config import load_config
    from castore.torch import job_environment

    config = load_config({"url": f"file://{tmp_path / 'store'}", "cache_dir": str(tmp_path / "local")})
    env = job_environment(config, "keys", base={k: v for k, v in os.environ.items() if not k.startswith("CASTORE_")})

    def run(environment: dict[str, str]) -> dict:
        done = subprocess.run([sys.executable, "-c", SCRIPT], env=environment, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run(env)
    assert first["kind"] == "RememberedKey" and first["alias"] and first["how"] == "computed"
    assert len(first["files"]) == 1 and first["files"][0].startswith("torch_key-")
    stored = tmp_path / "local" / "source-keys" / first["files"][0]
    assert stored.read_bytes().hex() == first["value"]

    plain = {k: v for k, v in env.items() if k != "CASTORE_TORCH_AUTOINSTALL"}
    assert run(plain)["value"] == first["value"]  # PyTorch's own computation agrees

    stored.write_bytes(b"\x01" * 32)  # the second process serves what is stored for these files
    again = run(env)
    assert again["value"] == "01" * 32 and again["how"] == "stored"


def test_a_key_computed_on_a_thread_is_what_the_first_call_returns(tmp_path: Path) -> None:
    import threading

    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow_key() -> str:
        calls.append(threading.current_thread().name)
        started.set()
        release.wait(5)
        return "from the thread"

    kept: list[bytes] = []
    remembered = source_keys.RememberedKey(slow_key, "triton_key", str.encode, kept.append)
    remembered.compute_in_background()
    assert started.wait(5)
    threading.Timer(0.2, release.set).start()
    assert remembered() == "from the thread"  # waited for the thread instead of computing it again
    assert calls == ["castore-source-key"] and kept == [b"from the thread"]


def test_the_thread_is_started_only_when_the_walk_would_import_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"castore_walk_probe_{tmp_path.name.replace('-', '_')}"
    root = tmp_path / name
    for folder in ("compiler", "backends/nvidia", "language/extra"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for init in ("", "compiler", "backends", "backends/nvidia", "language", "language/extra"):
        (root / init / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    try:
        importlib.import_module(f"{name}.backends")
        assert not source_keys.walk_imports_nothing(str(root), name)  # backends.nvidia and language.extra are not
        importlib.import_module(f"{name}.backends.nvidia")
        importlib.import_module(f"{name}.language.extra")
        assert source_keys.walk_imports_nothing(str(root), name)
    finally:
        for mod in [m for m in sys.modules if m.startswith(name)]:
            del sys.modules[mod]


def test_a_forked_child_neither_waits_for_its_parents_threads_nor_inherits_a_held_lock() -> None:
    import threading
    import time

    parent = os.getpid()
    release = threading.Event()

    def original() -> str:
        if os.getpid() != parent:
            return "child's"
        release.wait(10)
        return "parent's"

    slow_walk = threading.Event()
    taken = source_keys._Fingerprint(lambda: (slow_walk.wait(10), "print")[1], background=True)
    remembered = source_keys.RememberedKey(original, "triton_key", str.encode, lambda data: None)
    remembered.compute_in_background()
    remembered._lock.acquire()  # as if a thread of the parent held it at the fork
    pid = os.fork()
    if pid == 0:  # the child: neither thread exists here
        started = time.monotonic()
        ok = remembered() == "child's" and taken.get() == "" and time.monotonic() - started < 5
        os._exit(0 if ok else 1)
    remembered._lock.release()
    release.set()
    slow_walk.set()
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung on its parent's lock or thread")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert remembered() == "parent's" and taken.get() == "print"
