"""Opt-outs of single remote caches are honoured, and the remote AOTAutograd cache is never on without the FX one."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import torch._dynamo.config as dynamo_config  # noqa: E402
import torch._functorch.config as functorch_config  # noqa: E402
import torch._inductor.config as inductor_config  # noqa: E402

import castore.torch  # noqa: E402
from castore.torch import switches  # noqa: E402

pytestmark = pytest.mark.torch

CONFIGS = {"torch._inductor.config": inductor_config, "torch._functorch.config": functorch_config, "torch._dynamo.config": dynamo_config}
REMOTE = [(variable, module, attr) for module, attr, variable in switches.SWITCHES if "pgo" not in attr]


@pytest.fixture
def fresh_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith(("CASTORE_", "TORCHINDUCTOR_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CASTORE_URL", f"file://{tmp_path}/store")
    monkeypatch.setenv("CASTORE_CACHE_DIR", str(tmp_path / "local"))
    monkeypatch.setattr(switches, "_said_aot_off", False)
    try:
        yield
    finally:
        castore.torch.uninstall()


def remote_aot_decisions() -> list[bool]:
    """should_use_remote_autograd_cache() as each of PyTorch's modules that bind it sees it."""
    import importlib

    return [importlib.import_module(name).should_use_remote_autograd_cache() for name in switches.AOT_DECIDERS]


@pytest.mark.parametrize("variable, module, attr", REMOTE, ids=[v for v, _, _ in REMOTE])
def test_an_opted_out_remote_cache_stays_off(variable: str, module: str, attr: str, fresh_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(variable, "0")
    castore.torch.install()
    assert os.environ[variable] == "0", "castore overrode the user's opt-out"
    assert castore.torch.job_environment(castore.torch.active_session().config)[variable] == "0"
    assert getattr(CONFIGS[module], attr) is not True, f"castore switched {attr} on in-process"
    fx_off = variable == switches.FX_ENV
    for other_variable, other_module, other_attr in REMOTE:
        if other_variable == variable:
            continue
        expect_on = not (fx_off and other_variable == switches.AOT_ENV)
        assert (getattr(CONFIGS[other_module], other_attr) is True) == expect_on, other_attr
    if fx_off:  # the remote AOTAutograd cache follows the FX one, in this process and in the job's
        assert os.environ[switches.AOT_ENV] == "0"
        assert remote_aot_decisions() == [False, False, False]


def test_a_cache_turned_off_in_code_before_install_stays_off(fresh_env: None) -> None:
    with inductor_config.patch("autotune_remote_cache", False):  # (monkeypatch.setattr deletes config attributes)
        castore.torch.install()
        assert inductor_config.autotune_remote_cache is False
        assert inductor_config.fx_graph_remote_cache is True


def test_remote_aot_is_never_on_while_remote_fx_is_off(fresh_env: None, caplog: pytest.LogCaptureFixture) -> None:
    """A job (or PyTorch's own tests) turning the remote FX cache off after install(): AOTAutograd's remote cache
    goes off with it, said once in the log, and comes back with it."""
    castore.torch.install()
    assert remote_aot_decisions() == [True, True, True]
    with caplog.at_level(logging.INFO, logger="castore"):
        with inductor_config.patch("fx_graph_remote_cache", False):
            assert remote_aot_decisions() == [False, False, False]
            assert remote_aot_decisions() == [False, False, False]
    said = [r.getMessage() for r in caplog.records if "AOTAutograd" in r.getMessage()]
    assert len(said) == 1, said
    assert remote_aot_decisions() == [True, True, True]


@pytest.mark.slow  # two compiles: a cold one and a fresh machine's
@pytest.mark.timeout(600)
def test_a_job_with_remote_fx_off_compiles_without_fx_graph_cache_miss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_env: None) -> None:
    """PyTorch's own AOTAutograd-cache tests turn the remote FX cache off with strict_autograd_cache=True. With
    castore on, machine B used to get machine A's AOTAutograd entry from the bucket without its FX graph and raise
    FXGraphCacheMiss. Now nothing AOTAutograd goes to the bucket, and B compiles like a machine without castore."""
    from torch._dynamo.utils import counters

    from torch_scenarios import Fleet

    def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x * 2).sin() + y.cos()

    a, b = torch.rand(17), torch.rand(17)
    fleet = Fleet(f"file://{tmp_path}/store", tmp_path / "fleet", monkeypatch)
    # As in PyTorch's tests: castore is installed first (at `import torch` under `castore run`), the test's patch after.
    seed_config = {"enable_autograd_cache": True, "strict_autograd_cache": True}
    counters.clear()
    try:
        fleet.machine("a")
        compiled = torch.compile(fn)
        with inductor_config.patch({"fx_graph_cache": True, "fx_graph_remote_cache": False}), functorch_config.patch(seed_config):
            torch.testing.assert_close(compiled(a, b), fn(a, b))
        assert counters["aot_autograd"]["autograd_cache_saved"] == 1, dict(counters["aot_autograd"])
        fleet.leave()
        aot_entries = fleet.keys("pt2:autograd")

        m = fleet.machine("b")
        with inductor_config.patch({"fx_graph_cache": True, "fx_graph_remote_cache": False}), functorch_config.patch(seed_config):
            torch.testing.assert_close(compiled(a, b), fn(a, b))  # raised FXGraphCacheMiss before
        aot = counters["aot_autograd"]
        assert (aot["autograd_cache_miss"], aot["autograd_cache_hit"], aot["autograd_cache_saved"]) == (2, 0, 2)
        assert m.hits("aot-autograd") == 0 and m.hits("fx-graph") == 0
        assert m.hits("cpp-kernel") >= 1, "the rest of castore still serves machine B"
        assert aot_entries == [], "an AOTAutograd entry went to the bucket without its FX graph"
    finally:
        fleet.leave()
        counters.clear()
