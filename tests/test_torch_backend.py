"""``backend="castore"`` accepts what ``backend="inductor"`` accepts: mode, options, dynamic, with Inductor's checks."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch._inductor.compile_fx as compile_fx_module  # noqa: E402

import castore.torch  # noqa: E402
from castore.torch import backend as castore_backend_module  # noqa: E402

pytestmark = [pytest.mark.torch]


@pytest.fixture
def castore_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[dict[str, Any]]]:
    """castore configured on a file:// store; yields the config patches each top-level compile_fx call received."""
    for name in list(os.environ):
        if name.startswith("CASTORE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CASTORE_URL", f"file://{tmp_path}/store")
    monkeypatch.setenv("CASTORE_CACHE_DIR", str(tmp_path / "local"))
    seen: list[dict[str, Any]] = []
    original = compile_fx_module.compile_fx

    def recording_compile_fx(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("config_patches"):
            seen.append(dict(kwargs["config_patches"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", recording_compile_fx)
    torch._dynamo.reset()
    try:
        yield seen
    finally:
        torch._dynamo.reset()
        castore.torch.uninstall()


def fn(x: torch.Tensor) -> torch.Tensor:
    return (x * 3).sin() + 1


@pytest.mark.slow  # two Inductor compiles
def test_castore_backend_takes_mode_options_and_dynamic_like_inductor(castore_env: list[dict[str, Any]]) -> None:
    x = torch.randn(33)
    out = torch.compile(fn, backend="castore", mode="max-autotune", dynamic=True)(x)  # TypeError before
    torch.testing.assert_close(out, fn(x))
    expected = torch._TorchCompileInductorWrapper("max-autotune", None, True).config
    assert expected and castore_env[-1] == expected, "mode's settings differ from what inductor applies"
    assert castore_backend_module._wrappers[-1].dynamic is True
    assert castore.torch.active_session() is not None

    options = {"epilogue_fusion": False, "max_autotune": True}
    torch._dynamo.reset()
    out = torch.compile(fn, backend="castore", options=options)(x)
    torch.testing.assert_close(out, fn(x))
    assert castore_env[-1] == torch._TorchCompileInductorWrapper(None, options, None).config


def test_castore_backend_rejects_what_inductor_rejects(castore_env: list[dict[str, Any]]) -> None:
    with pytest.raises(RuntimeError, match="Unexpected optimization option no_such_option"):
        torch._TorchCompileInductorWrapper(None, {"no_such_option": 1}, None)
    compiled = torch.compile(fn, backend="castore", options={"no_such_option": 1})
    with pytest.raises(Exception, match="Unexpected optimization option no_such_option"):
        compiled(torch.randn(4))
