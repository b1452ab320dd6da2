"""The CI story on a real S3 server: prewarm a workload into a bundle, pull it into a fresh directory, close the
network, run the workload: nothing compiled, the same outputs. Then a fleet machine that prefetches the bundle at
start (CASTORE_BUNDLE) with read-only credentials: a handful of bucket requests, no write attempted, no warning.

Bucket requests are counted by a pass-through proxy in front of SeaweedFS (castore.testing.faultproxy), which is
stopped before the offline run: its endpoint is then a closed port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from castore.testing.faultproxy import FaultProxy

pytestmark = [pytest.mark.torch, pytest.mark.slow, pytest.mark.s3, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = [sys.executable, "-m", "castore.bench.demo_model", "--model", "transformer", "--mode", "infer", "--castore"]
MAX_PULL_REQUESTS = 10  # docs/SCALE.md: what a node costs the bucket


def _base_env(seaweedfs: Any, *, read_only: bool = False) -> dict[str, str]:
    drop = ("CASTORE_", "TORCHINDUCTOR_", "TORCH_", "TRITON_", "AWS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k not in ("PYTHONPATH", "XDG_CONFIG_HOME")}
    env.update(seaweedfs.env(read_only=read_only))
    env["PYTHONPATH"] = str(ROOT)
    return env


def _machine(root: Path, env: dict[str, str]) -> dict[str, str]:
    """A fresh host: empty Inductor, Triton, temp (precompiled headers), castore and config dirs."""
    env = dict(env)
    for name, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton"), ("TMPDIR", "tmp"),
                      ("CASTORE_CACHE_DIR", "castore"), ("XDG_CONFIG_HOME", "xdg")):  # fmt: skip
        (root / sub).mkdir(parents=True, exist_ok=True)
        env[name] = str(root / sub)
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # Run in the machine's temp dir: `python -m` puts the cwd on sys.path, where a folder named triton would shadow
    # the package.
    cwd = Path(env.get("TMPDIR") or cwd)
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def _demo_result(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith('{"model"')]
    assert lines, stdout[-4000:]
    return json.loads(lines[-1])


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "castore" in line.lower() and "warning" in line.lower()]


def _warm_up(seaweedfs: Any, url: str) -> None:
    """A new SeaweedFS bucket allocates its volumes at the first write; make it before the workload does."""
    import time

    import castore

    old = {k: os.environ.get(k) for k in seaweedfs.env()}
    os.environ.update(seaweedfs.env())
    try:
        deadline = time.monotonic() + 30
        with castore.open_store(url, cache_size=0) as store:
            while True:
                try:
                    store.put("castore-test-probe", "probe", b"probe" * 100, overwrite=True)
                    store.delete("castore-test-probe", "probe")
                    return
                except castore.CastoreError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def prewarmed(seaweedfs: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """CI: `castore prewarm` of the workload on a fresh builder with read-write credentials, into a new bucket."""
    bucket = seaweedfs.create_bucket()
    _warm_up(seaweedfs, seaweedfs.url(bucket, "ci"))
    root = tmp_path_factory.mktemp("builder")
    builder = _machine(root, _base_env(seaweedfs))
    proc = _run([sys.executable, "-m", "castore", "--url", seaweedfs.url(bucket, "ci"), "prewarm", "--name", "t", "--", *WORKLOAD], builder, root)
    cold = _demo_result(proc.stdout)
    assert cold["compiler_runs"] > 0, "the prewarm run must have compiled (else these tests prove nothing)"
    assert "published bundle t@1" in proc.stderr + proc.stdout, proc.stderr[-3000:]
    return {"bucket": bucket, "cold": cold}


def test_prewarm_pull_then_offline_start_compiles_nothing(seaweedfs: Any, prewarmed: dict[str, Any], tmp_path: Path) -> None:
    cold = prewarmed["cold"]
    proxy = FaultProxy(seaweedfs.endpoint, record=True).start()
    url = f"s3://{prewarmed['bucket']}/ci?endpoint={proxy.endpoint}"

    # Image build: pull with read-only credentials into a fresh directory, counting bucket requests.
    puller = _machine(tmp_path / "puller", _base_env(seaweedfs, read_only=True))
    target = tmp_path / "image" / "castore"
    proxy.reset_counters()
    proxy.seen.clear()
    pulled = _run([sys.executable, "-m", "castore", "--url", url, "pull", "t", "--into", str(target), "--json"], puller, tmp_path)
    pull_requests = proxy.requests
    methods = sorted({r.method for r in proxy.seen})
    report = json.loads(pulled.stdout)
    print(f"\npull: {pull_requests} bucket requests ({methods}), {report['objects']} objects, {report['bytes']} bytes, "
          f"{report['ranged_reads']} ranged reads, {report['entries']} entries")  # fmt: skip
    assert report["bundle"] == "t@1" and report["objects"] > report["entries"] and report["fallback_reads"] == 0
    assert pull_requests <= MAX_PULL_REQUESTS, f"pulling the bundle cost {pull_requests} requests"
    assert methods == ["GET"], methods
    assert (target / "env.sh").is_file() and (target / "bundle.json").is_file()

    # The network closes: the proxy stops, its endpoint is a closed port from now on.
    proxy.stop()

    # A fresh fleet machine: `. env.sh && python ...`, nothing else.
    node = _machine(tmp_path / "node", _base_env(seaweedfs, read_only=True))
    node.pop("CASTORE_CACHE_DIR")
    node["AWS_ENDPOINT_URL_S3"] = proxy.endpoint  # were anything to reach for S3, it would find nothing there
    command = ". \"$1\" && shift && exec \"$@\""
    warm_run = _run(["sh", "-c", command, "sh", str(target / "env.sh"), *WORKLOAD], node, tmp_path)
    warm = _demo_result(warm_run.stdout)
    caches = warm["castore"]["caches"]
    hits = {name: c["hits"] for name, c in caches.items()}
    print(f"offline: compiler runs {warm['compiler_runs']}, hits {hits}")
    assert warm["compiler_runs"] == 0, f"the offline machine ran the C++ compiler {warm['compiler_runs']} times"
    assert warm["output_digest"] == cold["output_digest"], "the offline machine computed different outputs"
    assert caches["fx-graph"]["hits"] >= 1 and caches["fx-graph"]["misses"] == 0, caches
    assert sum(c["get_errors"] + c["put_errors"] for c in caches.values()) == 0, caches
    assert not _warnings(warm_run.stderr), warm_run.stderr[-4000:]


def test_bundle_prefetch_on_a_read_only_fleet_machine(seaweedfs: Any, prewarmed: dict[str, Any], tmp_path: Path) -> None:
    """CASTORE_BUNDLE: the whole closure arrives with a few ranged GETs; the node, whose credentials are read-only
    but whose configuration is not, has nothing to write and never warns (tests/test_fleet_read_only.py: what
    it does when it has)."""
    cold = prewarmed["cold"]
    with FaultProxy(seaweedfs.endpoint, record=True) as proxy:
        node = _machine(tmp_path / "node", _base_env(seaweedfs, read_only=True))
        node.update(CASTORE_URL=f"s3://{prewarmed['bucket']}/ci?endpoint={proxy.endpoint}", CASTORE_BUNDLE="t")
        run = _run(WORKLOAD, node, tmp_path)
        seen = list(proxy.seen)
    result = _demo_result(run.stdout)
    stats = result["castore"]
    writes = [f"{r.method} {r.target}" for r in seen if r.method in ("PUT", "POST", "DELETE")]
    print(f"\nprefetching node: {len(seen)} bucket requests in all ({sorted({r.method for r in seen})}), "
          f"{stats['prefetched']} objects prefetched, compiler runs {result['compiler_runs']}")  # fmt: skip
    assert result["compiler_runs"] == 0 and result["output_digest"] == cold["output_digest"]
    assert stats["prefetched"] > 0, stats
    assert not writes, f"a machine served by its bundle attempted writes: {writes}"
    assert len(seen) <= MAX_PULL_REQUESTS, [f"{r.method} {r.target}" for r in seen]
    assert not _warnings(run.stderr), run.stderr[-4000:]
