"""Nothing queued is lost when a process exits: puts queued right before exit reach the store, within flush_timeout.

Every case is a real process that queues writes (or compiles) and exits at once, without flushing: the
interpreter's own shutdown must write them. Knobs: CASTORE_EXIT_TRIALS (2 MB put then exit, per store kind),
CASTORE_EXIT_COMPILE_RUNS (compile-then-exit processes against SeaweedFS).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import castore
from castore.torch.session import castore_key

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from exit_after_put import payload  # noqa: E402

TRIALS = int(os.environ.get("CASTORE_EXIT_TRIALS", "5"))
COMPILE_RUNS = int(os.environ.get("CASTORE_EXIT_COMPILE_RUNS", "12"))
BIG = 2 << 20


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ without castore's or PyTorch's settings (a castore install in this process exports some)."""
    drop = ("CASTORE_", "TORCHINDUCTOR_", "TORCH_", "TRITON_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k not in ("PYTHONPATH", "XDG_CONFIG_HOME")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra or {})
    return env


def _queue_and_exit(url: str, cache_dir: Path, namespace: str, entries: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPTS / "exit_after_put.py"), url, str(cache_dir), namespace, *entries],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=120,
    )


@pytest.fixture
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """(store URL, environment for the writing process): a SeaweedFS bucket, or a file:// store."""
    if request.param == "s3":
        seaweedfs = request.getfixturevalue("seaweedfs")
        yield seaweedfs.url(seaweedfs.create_bucket(), "exit"), _env(seaweedfs.env())
    else:
        yield f"file://{tmp_path}/store", _env()


@pytest.mark.parametrize("store_target", [pytest.param("s3", marks=pytest.mark.s3), "file"], indirect=True)
def test_a_put_queued_right_before_exit_is_stored(store_target: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    url, env = store_target
    stored = 0
    for trial in range(TRIALS):
        entries = [f"fx-graph:big-{trial}:{BIG}", f"aot-autograd:small-{trial}:300"]
        proc = _queue_and_exit(url, tmp_path / "local", "torch-exit", entries, env, tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "castore" not in proc.stderr, proc.stderr  # no warning: nothing failed, nothing was dropped
        with _opened(url, env) as store:
            for entry in entries:
                _, key, size = entry.split(":")
                assert store.get("torch-exit", castore_key(key)) == payload(key, int(size)), f"trial {trial}: {key} lost at exit"
                stored += 1
    print(f"\n{url.split(':')[0]}: {TRIALS} trials, {stored} entries queued right before exit, {stored} stored")


def test_exit_gives_up_after_flush_timeout_and_says_what_is_lost(tmp_path: Path) -> None:
    """A server that accepts connections and never answers: the exit waits flush_timeout, not the 30 s read timeout,
    and one warning names how many entries were not stored and of which caches."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        url = f"s3://bucket/p?endpoint=http://127.0.0.1:{server.getsockname()[1]}"
        env = _env({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "CASTORE_FLUSH_TIMEOUT": "2",
                    "CASTORE_READ_TIMEOUT": "30", "CASTORE_MAX_ATTEMPTS": "1"})
        entries = ["aot-autograd:a:300", f"fx-graph:b:{BIG}", "fx-graph:c:300"]
        started = time.monotonic()
        proc = _queue_and_exit(url, tmp_path / "local", "torch-exit", entries, env, tmp_path)
        elapsed = time.monotonic() - started
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "castore" in line]
    assert len(lines) == 1, proc.stderr
    assert "3 entries not written" in lines[0] and "aot-autograd 1, fx-graph 2" in lines[0] and "flush_timeout=2" in lines[0], lines
    assert 2.0 <= elapsed < 12.0, f"exit took {elapsed:.1f} s with flush_timeout=2 s"


class _opened:
    """The store at url, opened with env's credentials (without a local layer), closed on exit."""

    def __init__(self, url: str, env: dict[str, str]) -> None:
        self.url, self.env, self.saved = url, env, {}

    def __enter__(self) -> Any:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION"):
            self.saved[name] = os.environ.get(name)
            if name in self.env:
                os.environ[name] = self.env[name]
        self.store = castore.open_store(self.url, cache_size=0)
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.store.close()
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.timeout(900)
def test_compile_then_exit_loses_no_entry(seaweedfs: Any, tmp_path: Path) -> None:
    """The CI prewarm job: compile, exit at once. Every entry each process queued (FX, AOTAutograd, and in the first
    run the C++ kernels, header and ISA probes) and its fetch plan are in the bucket afterwards.

    The runs share one machine's directories and one namespace; each compiles a variant of the function with keys of
    its own (compile_and_exit.py), so each writes FX and AOTAutograd entries while only the first builds C++."""
    pytest.importorskip("torch")
    bucket = seaweedfs.create_bucket()
    url = seaweedfs.url(bucket, "exit")
    shared = {name: tmp_path / name for name in ("inductor", "triton", "tmp", "castore", "xdg")}
    for d in shared.values():
        d.mkdir()
    env = _env({
        **seaweedfs.env(),
        "CASTORE_URL": url,
        "CASTORE_NAMESPACE": "exit",
        "CASTORE_CACHE_DIR": str(shared["castore"]),
        "TORCHINDUCTOR_CACHE_DIR": str(shared["inductor"]),
        "TRITON_CACHE_DIR": str(shared["triton"]),
        "TMPDIR": str(shared["tmp"]),
        "XDG_CONFIG_HOME": str(shared["xdg"]),
    })

    def run(i: int) -> dict[str, Any]:
        proc = subprocess.run(
            [sys.executable, str(SCRIPTS / "compile_and_exit.py")],
            env={**env, "COMPILE_AND_EXIT_VARIANT": str(i)}, cwd=shared["tmp"], capture_output=True, text=True, timeout=400,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("WROTE ")]
        assert proc.returncode == 0 and lines, f"run {i} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        castore_lines = [line for line in proc.stderr.splitlines() if "castore" in line]
        assert not castore_lines, f"run {i}: {castore_lines}"
        return json.loads(lines[-1][len("WROTE ") :])

    started = time.monotonic()
    results = [run(0)]  # builds the C++ kernel, header and ISA probes
    with ThreadPoolExecutor(2) as pool:
        results += list(pool.map(run, range(1, COMPILE_RUNS)))
    elapsed = time.monotonic() - started

    checked = 0
    by_cache: dict[str, int] = {}
    missing: list[str] = []
    with _opened(url, env) as store:
        present = {key for _, key, _ in store.list("exit")}
        for i, result in enumerate(results):
            assert result["namespace"] == "exit" and result["fx_miss"] >= 1 and result["aot_saved"] >= 1, result
            queued = {key: cache for cache, key in result["queued"]}
            assert "fx-graph" in queued.values() and "aot-autograd" in queued.values(), result
            for key, cache in queued.items():
                checked += 1
                by_cache[cache] = by_cache.get(cache, 0) + 1
                if key not in present or (cache in ("fx-graph", "aot-autograd") and store.get("exit", key) is None):
                    missing.append(f"run {i}: {cache} {key}")
        plans = sum(1 for key in present if key.startswith("plan."))  # one per run: each run's first lookup differs
        checked += COMPILE_RUNS
        if plans != COMPILE_RUNS:
            missing.append(f"fetch plans: {plans} of {COMPILE_RUNS}")
    print(
        f"\ncompile-then-exit: {COMPILE_RUNS} runs in {elapsed:.0f} s, {checked} entries checked "
        f"({', '.join(f'{c} {n}' for c, n in sorted(by_cache.items()))}, fetch-plan {COMPILE_RUNS}), {len(missing)} lost"
    )
    assert not missing, missing
