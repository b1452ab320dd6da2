"""With signing required, what a bucket writer without the key plants is never loaded (SeaweedFS, CPU torch).

CI (holding the signing key) compiles three graphs a, b, c into a fresh bucket. An attacker with write access but
no key then plants, the way the bucket lets anyone:
- graph a's valid FX and AOTAutograd entries under graph b's keys (get, then put --force): wrong outputs if used;
- a pickle that writes a marker file when unpickled under graph c's FX and AOTAutograd keys;
- a shared library whose constructor writes a marker file under graph c's C++ kernel keys.
A fleet machine that requires signatures compiles b and c: correct outputs, no marker, nothing planted on its
disk, the refusals counted. The same machine without keys shows that each attack is live (the control).
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from castore.format import keys as keyfmt
from castore.signing import SecretKey, write_key_pair

pytestmark = [pytest.mark.torch, pytest.mark.slow, pytest.mark.s3, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "scripts" / "trust_graphs.py"
PLANTED_SO_TAG = b"castore-planted-shared-object"


class _Exec:
    """Unpickling this runs ``code``: what a malicious FX/AOT entry does."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (self.code,))


def _planted_pickle_entry(marker: Path) -> bytes:
    # Write the marker, then fail the load so that PyTorch falls back to compiling (the control run stays usable).
    payload = pickle.dumps(_Exec(f"open({str(marker)!r}, 'a').write('ran\\n'); raise RuntimeError('planted')"))
    return json.dumps({"data": base64.b64encode(payload).decode()}).encode()


def _planted_shared_object(tmp_path: Path, marker: Path) -> bytes:
    source = tmp_path / "planted.c"
    source.write_text(
        "#include <stdio.h>\n"
        f'static const char tag[] __attribute__((used)) = "{PLANTED_SO_TAG.decode()}";\n'
        "__attribute__((constructor)) static void planted(void) {\n"
        f'  FILE *f = fopen("{marker}", "a"); if (f) {{ fputs("ran\\n", f); fclose(f); }}\n'
        "}\n"
    )
    target = tmp_path / "planted.so"
    subprocess.run([shutil.which("gcc") or "cc", "-shared", "-fPIC", "-o", str(target), str(source)], check=True)
    return target.read_bytes()


def _base_env(seaweedfs: Any, machine: Path, url: str) -> dict[str, str]:
    drop = ("CASTORE_", "TORCHINDUCTOR_", "TORCH_", "TRITON_", "AWS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k not in ("PYTHONPATH", "XDG_CONFIG_HOME")}
    env.update(seaweedfs.env())
    for d in ("inductor", "triton", "tmp", "castore", "xdg"):
        (machine / d).mkdir(parents=True, exist_ok=True)
    env.update(
        PYTHONPATH=str(ROOT),
        TORCHINDUCTOR_CACHE_DIR=str(machine / "inductor"),
        TRITON_CACHE_DIR=str(machine / "triton"),
        TMPDIR=str(machine / "tmp"),
        CASTORE_CACHE_DIR=str(machine / "castore"),
        XDG_CONFIG_HOME=str(machine / "xdg"),
        TORCHINDUCTOR_COMPILE_THREADS="1",  # kernels are built and loaded in the process itself
        CASTORE_URL=url,
        CASTORE_SLOW_REQUEST="120",  # 2 busy cores: a slow get must not switch the store off mid-test
    )
    return env


def _run(env: dict[str, str], graphs: str, *, list_keys: bool = False) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    env = {**env, "TRUST_GRAPHS": graphs, "TRUST_LIST_KEYS": "1" if list_keys else "0"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, cwd=env["TMPDIR"], capture_output=True, text=True, timeout=400)
    out: dict[str, Any] = {"graphs": {}, "keys": {}, "result": None}
    for line in proc.stdout.splitlines():
        tag, _, rest = line.partition(" ")
        if tag in ("GRAPH", "KEYS"):
            name, _, payload = rest.partition(" ")
            out["graphs" if tag == "GRAPH" else "keys"][name] = json.loads(payload)
        elif tag == "RESULT":
            out["result"] = json.loads(rest)
    return proc, out


def test_entries_planted_without_the_signing_key_are_never_loaded(seaweedfs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import castore

    url = seaweedfs.url(seaweedfs.create_bucket(), "fleet")
    key = SecretKey.generate("ci-test")
    secret_path, _ = write_key_pair(key, tmp_path / "keys")

    # CI: compiles a, b, c, signing everything it publishes.
    ci_env = {**_base_env(seaweedfs, tmp_path / "ci", url), "CASTORE_SIGNING_KEY": str(secret_path)}
    proc, ci = _run(ci_env, "a,b,c", list_keys=True)
    assert proc.returncode == 0 and ci["result"], proc.stderr[-6000:]
    namespace = ci["result"]["namespace"]

    # The attacker: bucket credentials, no key. Reads what it needs, plants with put --force.
    markers = tmp_path / "markers"
    markers.mkdir()
    pickle_marker, so_marker = markers / "pickle-ran", markers / "so-ran"
    planted_so = _planted_shared_object(tmp_path, so_marker)
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    attacker = castore.open_store(config=castore.load_config({"url": url, "cache_size": 0}, env={}, cwd=tmp_path))

    def by_artifact(graph: str) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for k in ci["keys"][graph]:
            manifest = attacker.stat(namespace, k)
            if manifest is not None:
                found.setdefault(str(manifest.meta.get("artifact")), []).append(k)
        return found

    a, b, c = by_artifact("a"), by_artifact("b"), by_artifact("c")
    for graph in (a, b, c):
        assert len(graph.get("fx-graph", [])) == 1 and len(graph.get("aot-autograd", [])) == 1, graph
    assert c.get("cpp-kernel"), f"graph c built no C++ kernel the attacker could replace: {c}"
    with attacker:
        for artifact in ("fx-graph", "aot-autograd"):
            stolen = attacker.get(namespace, a[artifact][0])
            attacker.put(namespace, b[artifact][0], stolen, meta={"artifact": artifact}, overwrite=True)
            attacker.put(namespace, c[artifact][0], _planted_pickle_entry(pickle_marker), meta={"artifact": artifact}, overwrite=True)
        for k in c["cpp-kernel"]:
            attacker.put(namespace, k, planted_so, meta={"artifact": "cpp-kernel"}, overwrite=True)
        planted_keys = [b["fx-graph"][0], b["aot-autograd"][0], c["fx-graph"][0], c["aot-autograd"][0], *c["cpp-kernel"]]
        assert all(keyfmt.validate_key(k) for k in planted_keys)

    # A fleet machine: the CI's public key, signatures required (the default), read-only.
    fleet_env = {**_base_env(seaweedfs, tmp_path / "fleet", url), "CASTORE_TRUSTED_KEYS": key.public.text(), "CASTORE_READ_ONLY": "1"}
    proc, fleet = _run(fleet_env, "b,c")
    assert proc.returncode == 0 and fleet["result"], proc.stderr[-6000:]
    print(f"\nfleet machine, signatures required: {fleet['graphs']}, untrusted {fleet['result']['stats'].get('untrusted')}")
    assert not pickle_marker.exists(), "a planted pickle was unpickled"
    assert not so_marker.exists(), "a planted shared object was loaded"
    for graph in ("b", "c"):
        assert fleet["graphs"][graph]["max_abs_diff"] < 1e-5, fleet["graphs"]
        assert fleet["graphs"][graph]["digest"] == ci["graphs"][graph]["digest"]
    stats = fleet["result"]["stats"]
    assert stats["untrusted"] >= 3, stats
    assert stats["caches"]["cpp-kernel"]["misses"] >= len(c["cpp-kernel"]), stats  # graph c's kernels: refused
    for path in (tmp_path / "fleet").rglob("*"):
        if path.is_file() and path.stat().st_size < (1 << 24):
            assert PLANTED_SO_TAG not in path.read_bytes(), f"planted bytes written to {path}"
    refusals = [line for line in proc.stderr.splitlines() if "untrusted entry treated as a miss" in line]
    assert refusals and len(refusals) == len(set(refusals)), "one log line per refused entry"

    # The control: the same machine without keys loads what was planted (so the assertions above can fail).
    control_env = {**_base_env(seaweedfs, tmp_path / "control", url), "CASTORE_READ_ONLY": "1"}
    proc, control = _run(control_env, "b,c")
    print(f"control, no keys: {control['graphs']}; pickle ran: {pickle_marker.exists()}, .so loaded: {so_marker.exists()}")
    assert control["graphs"]["b"]["max_abs_diff"] > 0.5, "the moved entry was not used by a reader without keys"
    assert pickle_marker.exists(), "the planted pickle did not run in the control: the test would prove nothing"
    assert so_marker.exists(), "the planted shared object was not loaded in the control: the test would prove nothing"
