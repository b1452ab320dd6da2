"""castore doctor names the one environment field that differs between this machine and the bucket's entries.

Entries are written to SeaweedFS with a writer fingerprint forged from this machine's own, one field changed;
doctor then runs on this machine.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("torch")

import castore  # noqa: E402
from castore.format import keys  # noqa: E402
from castore.format.manifest import Manifest  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.s3]


@pytest.fixture(scope="module")
def here() -> dict[str, object]:
    from castore.torch.fingerprint import fingerprint

    return fingerprint()


@pytest.fixture
def namespace() -> str:
    from castore.torch import default_namespace

    return default_namespace()


def _doctor(url: str, tmp_path: Path, *args: str) -> tuple[int, dict | str]:
    from click.testing import CliRunner

    from castore.cli import main

    as_json = "--text" not in args
    argv = ["--url", url, "--cache-dir", str(tmp_path / "layer"), "doctor", *[a for a in args if a != "--text"]]
    result = CliRunner().invoke(main, argv + (["--json"] if as_json else []), catch_exceptions=False)
    if result.exit_code != 0:
        return result.exit_code, result.output
    return 0, json.loads(result.stdout) if as_json else result.stdout


def _write_entries(url: str, namespace: str, fp: dict[str, object], n: int, tag: str) -> None:
    from castore.torch.fingerprint import as_meta

    with castore.open_store(url, cache_size=0) as store:
        for i in range(n):
            store.put(namespace, f"{tag}-{i}", os.urandom(64), meta={"artifact": "fx-graph", **as_meta(fp)})


CHANGES = [
    ("torch", "2.11.0", "install torch==2.11.0"),
    ("flag.inductor.freezing", True, "torch._inductor.config.freezing"),
    ("gpu_capability", "9.0", "GPU architecture"),
    ("cpu_isa", "avx2", "C++ kernels were generated for avx2"),
]


@pytest.mark.parametrize(("field", "value", "fix"), CHANGES, ids=[c[0] for c in CHANGES])
def test_doctor_names_the_one_field_that_differs(s3_url: str, tmp_path: Path, here, namespace: str, field: str, value, fix: str) -> None:  # noqa: ANN001
    forged = dict(here, **{field: value})
    if field.startswith("flag.inductor."):
        forged["inductor_config_hash"] = "0" * 16  # a flag changes its module's hash as well
    _write_entries(s3_url, namespace, forged, 3, "near")
    _write_entries(s3_url, namespace, dict(forged, python="3.9.0"), 1, "far")  # two fields apart: not the nearest

    code, report = _doctor(s3_url, tmp_path)
    assert code == 0, report
    nearest = report["groups"][0]
    assert list(nearest["differs"]) == [field], nearest
    assert nearest["entries"] == 3 and len(report["groups"]) == 2
    assert fix in nearest["differs"][field]["fix"]

    code, text = _doctor(s3_url, tmp_path, "--text")
    assert f"- {field}: " in text and fix in text and "would hit 3 entries" in text


def test_doctor_sees_an_unnamed_config_change_through_the_hash(s3_url: str, tmp_path: Path, here, namespace: str) -> None:  # noqa: ANN001
    _write_entries(s3_url, namespace, dict(here, inductor_config_hash="f" * 16, inductor_changed=""), 2, "h")
    code, report = _doctor(s3_url, tmp_path)
    assert code == 0 and list(report["groups"][0]["differs"]) == ["inductor_config_hash"]


def test_doctor_names_a_path_set_in_the_config_behind_the_hash(s3_url: str, tmp_path: Path, here, namespace: str) -> None:  # noqa: ANN001
    changed = json.dumps({"aot_inductor.output_path": "/home/ci/out"})
    _write_entries(s3_url, namespace, dict(here, inductor_config_hash="e" * 16, inductor_changed=changed), 2, "p")
    code, report = _doctor(s3_url, tmp_path)
    differs = report["groups"][0]["differs"]
    assert code == 0 and list(differs) == ["inductor.aot_inductor.output_path"], differs
    assert "a path that enters PyTorch's keys" in differs["inductor.aot_inductor.output_path"]["fix"]


def test_doctor_says_entries_of_the_same_environment_can_hit(s3_url: str, tmp_path: Path, here, namespace: str) -> None:  # noqa: ANN001
    _write_entries(s3_url, namespace, here, 4, "same")
    code, text = _doctor(s3_url, tmp_path, "--text")
    assert code == 0 and "matches the environment of 4 entries" in text and "PyTorch's keys themselves" in text


def test_doctor_compares_with_a_bundle(s3_url: str, tmp_path: Path, here, namespace: str) -> None:  # noqa: ANN001
    from castore.torch.fingerprint import as_meta

    code, out = _doctor(s3_url, tmp_path, "--bundle", "job")
    assert code == 1 and "no bundle named 'job'" in out
    bundle = Manifest(namespace="bundles", key="job", size=0, digest=hashlib.sha256(b"").digest(), kind="bundle",
                      refs=[(namespace, f"k{i}") for i in range(5)], meta=as_meta(dict(here, cpu_isa="avx2")))
    bundle.inline = b"CAS\x00"
    with castore.open_store(s3_url, cache_size=0) as store:
        store.backend.put(keys.manifest_path("bundles", "job"), bundle.to_bytes())
    code, report = _doctor(s3_url, tmp_path, "--bundle", "job")
    assert code == 0 and report["bundle"] == "bundles/job" and report["bundle_entries"] == 5
    assert list(report["groups"][0]["differs"]) == ["cpu_isa"]


def test_entries_record_their_writers_fingerprint(here) -> None:  # noqa: ANN001
    """What the torch integration records at put time is what doctor reads back."""
    from castore.torch.fingerprint import from_meta
    from castore.torch.remote_caches import session_meta

    meta = session_meta()
    assert from_meta(meta) == here
    assert meta["torch"] == here["torch"]  # the older fields stay


def test_the_recorded_fingerprint_follows_config_changes_and_is_not_recomputed_between_them(monkeypatch) -> None:  # noqa: ANN001
    """Every put records the fingerprint; it is computed again only when a setting (or the ISA) changed."""
    import torch._inductor.config as inductor_config

    from castore.torch import fingerprint as fp_module
    from castore.torch.remote_caches import session_meta

    computed = []
    real = fp_module.fingerprint
    monkeypatch.setattr(fp_module, "fingerprint", lambda: computed.append(1) or real())
    first = session_meta()
    n = len(computed)
    assert session_meta() == first and len(computed) == n  # nothing changed: the recorded fields again
    with inductor_config.patch(max_autotune=not inductor_config.max_autotune):
        flagged = session_meta()
    assert flagged["env.flag.inductor.max_autotune"] != first["env.flag.inductor.max_autotune"]
    with inductor_config.patch(epilogue_fusion=not inductor_config.epilogue_fusion):  # behind the hash only
        hashed = session_meta()
    assert hashed["env.inductor_config_hash"] != first["env.inductor_config_hash"]
    assert hashed["env.inductor_changed"] != first["env.inductor_changed"]
    # Back to the defaults: the same fields, the lists of changed settings included.
    back = session_meta()
    assert back == first
    assert back == fp_module.as_meta() | {k: v for k, v in back.items() if not k.startswith("env.")}


def test_a_setting_assigned_its_default_value_is_not_named_as_changed() -> None:
    """PyTorch assigns some settings their default while it compiles (deterministic): a machine that compiled does
    not differ from one that did not."""
    import torch._inductor.config as inductor_config

    from castore.torch.fingerprint import fingerprint

    default = inductor_config._config["deterministic"].default
    before = fingerprint()["inductor_changed"]
    with inductor_config.patch(deterministic=default):
        assert "deterministic" in inductor_config._get_dict(skip_default=True)  # set, to its default
        assert fingerprint()["inductor_changed"] == before
    with inductor_config.patch(deterministic=not default):
        assert "deterministic" in json.loads(fingerprint()["inductor_changed"])


@pytest.mark.slow
def test_the_isa_read_without_compiling_is_the_one_inductor_picks() -> None:
    """Writers record Inductor's pick (probed while compiling); doctor reads it without compiling: they agree."""
    import subprocess
    import sys

    code = (
        "from castore.torch.fingerprint import cpu_isa; before = cpu_isa()\n"
        "from torch._inductor import cpu_vec_isa; picked = str(cpu_vec_isa.pick_vec_isa())\n"
        "print(repr((before, picked, cpu_isa())))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True).stdout
    before, picked, after = eval(out.strip().splitlines()[-1])  # noqa: S307 - our own repr of three strings
    assert before == picked == after
