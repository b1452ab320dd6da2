"""The vector-ISA probe's verdict through the store (castore.torch.isa_probe).

The end-to-end proof, a fresh machine that starts no probe child, is in test_torch_fresh_machine.py. These
tests run PyTorch's real probe: a child Python that dlopens the file it is given.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("torch")

from castore.config import load_config  # noqa: E402
from castore.torch import isa_probe  # noqa: E402
from castore.torch.import_hooks import Patches  # noqa: E402
from castore.torch.session import StoreSession  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture
def hooked(tmp_path: Path) -> Iterator[tuple[StoreSession, object]]:
    from torch._inductor import cpu_vec_isa

    if "_probe_load" not in cpu_vec_isa.VecISA.__dict__:
        pytest.skip("this torch has no VecISA._probe_load")
    config = load_config({"url": f"file://{tmp_path}/store", "cache_dir": str(tmp_path / "local")}, env={})
    session = StoreSession(config, "torch-test")
    patches = Patches()
    isa_probe.install(session, patches)
    try:
        yield session, cpu_vec_isa.VecAVX2()
    finally:
        patches.undo()
        session.close()


def test_a_stored_pass_skips_the_probe_child(hooked: tuple[StoreSession, object], tmp_path: Path) -> None:
    session, isa = hooked
    probe = tmp_path / "probe.so"
    probe.write_bytes(b"not a shared object")  # the real child would fail to dlopen it
    key = isa_probe.probe_key(str(isa), str(probe))
    assert key is not None
    session.put(isa_probe.CACHE, key, isa_probe.PASSED)
    assert session.flush(30)
    before = isa_probe.probes_run
    assert isa._probe_load(str(probe)) is True  # type: ignore[attr-defined]
    assert isa_probe.probes_run == before, "a stored pass must not start the child"


def test_a_failed_probe_runs_the_child_and_is_never_stored(hooked: tuple[StoreSession, object], tmp_path: Path) -> None:
    session, isa = hooked
    probe = tmp_path / "probe.so"
    probe.write_bytes(b"not a shared object")
    before = isa_probe.probes_run
    assert isa._probe_load(str(probe)) is False  # type: ignore[attr-defined]
    assert isa_probe.probes_run == before + 1
    assert session.flush(30)
    assert session.get(isa_probe.CACHE, isa_probe.probe_key(str(isa), str(probe)) or "") is None
    assert session.stats.caches[isa_probe.CACHE].puts == 0


def test_another_value_under_the_key_is_not_a_pass(hooked: tuple[StoreSession, object], tmp_path: Path) -> None:
    session, isa = hooked
    probe = tmp_path / "probe.so"
    probe.write_bytes(b"not a shared object")
    session.put(isa_probe.CACHE, isa_probe.probe_key(str(isa), str(probe)) or "", b"passed?")
    assert session.flush(30)
    assert isa._probe_load(str(probe)) is False  # type: ignore[attr-defined]


def test_the_key_changes_with_the_isa_the_binary_and_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = tmp_path / "probe.so"
    probe.write_bytes(b"one binary")
    base = isa_probe.probe_key("avx2", str(probe))
    assert base is not None and base.startswith("isa.avx2.")
    assert isa_probe.probe_key("avx512", str(probe)) != base
    monkeypatch.setattr(isa_probe, "cpu_identity", lambda: "x86_64|another CPU|avx2 fma sse4_2")
    assert isa_probe.probe_key("avx2", str(probe)) != base
    monkeypatch.undo()
    probe.write_bytes(b"another binary")
    assert isa_probe.probe_key("avx2", str(probe)) != base
    assert isa_probe.probe_key("avx2", str(tmp_path / "missing.so")) is None


def test_the_cpu_identity_names_the_model_and_flags() -> None:
    identity = isa_probe.cpu_identity()
    machine, model, flags = identity.split("|", 2)
    assert machine and model
    if Path("/proc/cpuinfo").exists():
        assert flags and flags.split() == sorted(flags.split())
