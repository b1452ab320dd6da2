"""Background writes wait while this process compiles (castore.torch.compile_activity): the writer's uploads run
when the compile pauses, a flush lets them through at once, and a compile that never pauses holds them only so
long. The last test compiles for real and checks Dynamo's callbacks feed the gate."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from castore.config import load_config
from castore.torch.compile_activity import WriteGate
from castore.torch.session import StoreSession


def _session(tmp_path: Path) -> StoreSession:
    config = load_config({"url": f"file://{tmp_path}/store", "cache_dir": str(tmp_path / "local")}, env={})
    return StoreSession(config, "torch-test")


def _stored(s: StoreSession, key: str) -> bool:
    return s.store.get(s.namespace, key) is not None


def test_a_gate_with_no_compile_lets_writes_through_at_once() -> None:
    gate = WriteGate(settle=0.2, max_hold=5)
    assert gate.wait(time.monotonic()) < 0.05


def test_a_gate_holds_writes_until_the_compile_has_paused_for_the_settle_time() -> None:
    gate = WriteGate(settle=0.3, max_hold=30)
    gate.compile_started()
    released = threading.Event()
    threading.Thread(target=lambda: (gate.wait(time.monotonic()), released.set()), daemon=True).start()
    assert not released.wait(0.5)  # compiling
    ended = time.monotonic()
    gate.compile_ended()
    assert released.wait(5)
    assert time.monotonic() - ended >= 0.29  # the settle time after the compile's end


def test_a_compile_that_never_pauses_holds_a_write_at_most_max_hold() -> None:
    gate = WriteGate(settle=0.1, max_hold=0.4)
    gate.compile_started()
    held = gate.wait(time.monotonic())
    assert 0.35 <= held < 3


def test_a_session_writes_after_the_compile_and_a_flush_does_not_wait_for_it(tmp_path: Path) -> None:
    s = _session(tmp_path)
    s.write_gate.settle = 0.1
    s.write_gate.compile_started()
    s.put("fx-graph", "k1", b"one" * 100)
    time.sleep(0.5)
    assert not _stored(s, "k1")  # held while compiling
    s.write_gate.compile_ended()
    deadline = time.monotonic() + 10
    while not _stored(s, "k1") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _stored(s, "k1")
    assert s.stats.writes_held_seconds >= 0.4

    s.write_gate.compile_started()  # a flush (as at exit) does not wait for the compile to end
    s.put("fx-graph", "k2", b"two" * 100)
    assert s.flush(10)
    assert _stored(s, "k2")
    s.write_gate.compile_ended()
    s.close()


def test_a_file_put_is_read_by_the_writer_and_a_vanished_file_is_skipped(tmp_path: Path) -> None:
    s = _session(tmp_path)
    kept, gone = tmp_path / "kernel.so", tmp_path / "gone.so"
    kept.write_bytes(b"\x7fELF" + b"k" * 5000)
    gone.write_bytes(b"temporary")
    s.write_gate.compile_started()
    s.put_file("cpp-kernel", "kept", str(kept))
    s.put_file("cpp-kernel", "gone", str(gone))
    gone.unlink()  # before the writer reads it
    s.write_gate.compile_ended()
    assert s.flush(10)
    assert s.store.get(s.namespace, "kept") == kept.read_bytes()
    assert not _stored(s, "gone")
    assert s.stats.caches["cpp-kernel"].puts == 1
    s.close()


@pytest.mark.torch
def test_dynamo_reports_its_compiles_to_the_installed_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    import torch

    import castore.torch

    session = castore.torch.install(f"file://{tmp_path}/store", cache_dir=str(tmp_path / "local"))
    try:
        seen_while_compiling: list[int] = []

        def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):  # noqa: ANN202
            seen_while_compiling.append(session.write_gate._compiling)
            return gm.forward

        assert session.write_gate._compiling == 0
        torch.compile(lambda x: (x * 2).sin(), backend=backend)(torch.ones(3))
        assert seen_while_compiling == [1]
        assert session.write_gate._compiling == 0 and session.write_gate._last_end > 0
    finally:
        castore.torch.uninstall()
    import torch._dynamo

    assert session.write_gate.compile_started not in torch._dynamo.callback_handler.start_callbacks  # undone


@pytest.mark.torch
def test_a_triton_kernel_tuned_at_its_first_run_holds_writes_like_a_compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Autotuning and coordinate-descent tuning run when a kernel first runs, after Dynamo's compile has ended."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    from torch._inductor.runtime import triton_heuristics as th

    import castore.torch
    from castore.torch.compile_activity import RUNTIME_TUNING

    seen: dict[str, int] = {}
    gate_of: list[WriteGate] = []

    def recorder(name: str):  # noqa: ANN202
        def method(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            seen[name] = gate_of[0]._compiling
            if args and args[0] == "fail":
                raise RuntimeError("benchmark failed")
            return name

        return method

    for name in RUNTIME_TUNING:  # what PyTorch's methods would do, observed from inside
        monkeypatch.setattr(th.CachingAutotuner, name, recorder(name))
    session = castore.torch.install(f"file://{tmp_path}/store", cache_dir=str(tmp_path / "local"))
    gate_of.append(session.write_gate)
    try:
        tuner = object.__new__(th.CachingAutotuner)
        tuner.save_cache_hook = True  # not a kernel castore keeps winners of
        for name in RUNTIME_TUNING:
            assert getattr(tuner, name)() == name
            assert seen[name] == 1 and session.write_gate._compiling == 0
        last_end = session.write_gate._last_end
        with pytest.raises(RuntimeError):
            tuner.autotune_to_one_config("fail")
        assert session.write_gate._compiling == 0 and session.write_gate._last_end >= last_end > 0
    finally:
        castore.torch.uninstall()
    for name in RUNTIME_TUNING:
        assert getattr(th.CachingAutotuner, name).__name__ == "method"  # undone
