"""castore patches PyTorch's modules when PyTorch imports them: install() itself imports neither Dynamo nor Inductor."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from castore.torch.import_hooks import Patches, when_imported


@pytest.fixture
def fresh_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A package not imported yet, whose module sets ``done`` as its last statement."""
    name = f"castore_hook_probe_{tmp_path.name.replace('-', '_')}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("value = 1\ndone = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield f"{name}.mod"
    for mod in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[mod]


def test_a_module_already_imported_is_patched_at_once() -> None:
    seen: list[ModuleType] = []
    when_imported("json", seen.append)
    assert seen == [json]


def test_a_patch_waits_for_the_import_and_sees_the_whole_module(fresh_package: str) -> None:
    seen: list[bool] = []
    when_imported(fresh_package, lambda m: seen.append(getattr(m, "done", False)))
    assert seen == []
    importlib.import_module(fresh_package)
    assert seen == [True]
    importlib.reload(sys.modules[fresh_package])  # once only
    assert seen == [True]


def test_probing_for_a_module_does_not_use_the_hook_up(fresh_package: str) -> None:
    # Libraries probe for optional packages with find_spec long before (or without) importing them.
    seen: list[str] = []
    when_imported(fresh_package, lambda m: seen.append(m.__name__))
    assert importlib.util.find_spec(fresh_package) is not None
    assert seen == []
    importlib.import_module(fresh_package)
    assert seen == [fresh_package]


def test_a_module_importing_on_another_thread_is_patched_once_it_is_done(fresh_package: str) -> None:
    path = Path(importlib.util.find_spec(fresh_package).origin)  # type: ignore[union-attr,arg-type]
    path.write_text("import time\ntime.sleep(0.5)\ndone = True\n")
    importer = threading.Thread(target=importlib.import_module, args=(fresh_package,))
    importer.start()
    deadline = time.monotonic() + 10
    while fresh_package not in sys.modules and time.monotonic() < deadline:
        time.sleep(0.005)
    seen: list[bool] = []
    when_imported(fresh_package, lambda m: seen.append(getattr(m, "done", False)))  # its spec was found before
    importer.join()
    assert seen == [True]


def test_a_cancelled_patch_never_runs(fresh_package: str) -> None:
    seen: list[str] = []
    cancel = when_imported(fresh_package, lambda m: seen.append(m.__name__))
    cancel()
    importlib.import_module(fresh_package)
    assert seen == []


def test_a_failing_patch_is_logged_and_the_import_still_succeeds(fresh_package: str, caplog: pytest.LogCaptureFixture) -> None:
    def broken(module: ModuleType) -> None:
        raise AttributeError("no such function in this torch")

    with caplog.at_level(logging.WARNING, logger="castore.torch"):
        when_imported(fresh_package, broken)
        module = importlib.import_module(fresh_package)
    assert module.value == 1
    assert "could not patch" in caplog.text and "no such function" in caplog.text


def test_undo_restores_own_inherited_and_module_attributes(fresh_package: str) -> None:
    class Base:
        def method(self) -> str:
            return "base"

    class Child(Base):
        def own(self) -> str:
            return "own"

    config = SimpleNamespace(flag=False)
    patches = Patches()
    assert patches.replace(Child, "method", lambda self: "patched") is Base.__dict__["method"]
    original_own = patches.replace(Child, "own", lambda self: "patched own")
    patches.replace(config, "flag", True)
    patches.on_import(fresh_package, lambda m: patches.replace(m, "value", 2))
    module = importlib.import_module(fresh_package)
    assert (Child().method(), Child().own(), config.flag, module.value) == ("patched", "patched own", True, 2)
    assert original_own(Child()) == "own"
    patches.undo()
    assert "method" not in Child.__dict__ and Child().method() == "base"
    assert (Child().own(), config.flag, module.value) == ("own", False, 1)


def _python(code: str, tmp_path: Path, env_extra: dict[str, str] | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CASTORE_", "TORCHINDUCTOR_", "TRITON_"))}
    env["CASTORE_URL"] = f"file://{tmp_path}/store"
    env["CASTORE_CACHE_DIR"] = str(tmp_path / "local")
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.torch
def test_install_imports_no_dynamo_or_inductor_and_patches_them_on_import(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    result = _python(
        """
        import json, sys, torch
        heavy = ("torch._dynamo.convert_frame", "torch._inductor.codecache", "torch._inductor.remote_cache")
        before = [m for m in heavy if m in sys.modules]
        import castore.torch
        castore.torch.install()
        after_install = [m for m in heavy if m in sys.modules]
        import torch._inductor.codecache as codecache, torch._inductor.config as config
        import torch._inductor.remote_cache as rc
        import torch._functorch.config as fconfig
        print(json.dumps({
            "before": before, "after_install": after_install,
            "worker": codecache._worker_compile_cpp.__module__,
            "backend": getattr(rc.RemoteFxGraphCache.backend_override_cls, "__name__", None),
            "switches": [config.fx_graph_remote_cache, config.autotune_remote_cache, fconfig.enable_remote_autograd_cache],
        }))
        """,
        tmp_path,
    )
    assert result["before"] == [] and result["after_install"] == []
    assert result["worker"] == "castore.torch.artifacts"
    assert result["backend"] == "Castore_fx_graph"
    assert result["switches"] == [True, True, True]


@pytest.mark.torch
def test_autoload_survives_a_find_spec_probe_for_torch_before_its_import(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from castore.config import load_config
    from castore.torch import job_environment

    config = load_config({"url": f"file://{tmp_path}/store", "cache_dir": str(tmp_path / "local")}, env={})
    env = {k: v for k, v in job_environment(config, "torch-test").items() if k.startswith("CASTORE_") or k == "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], os.getcwd()])
    result = _python(
        """
        import importlib.util, json, sys
        assert importlib.util.find_spec("torch") is not None  # as transformers' is_torch_available() does
        import torch, castore.torch
        session = castore.torch.active_session()
        heavy = [m for m in ("torch._dynamo.convert_frame", "torch._inductor.codecache") if m in sys.modules]
        print(json.dumps({"active": session is not None, "namespace": session and session.namespace, "heavy": heavy}))
        """,
        tmp_path,
        env,
    )
    # castore is on, and a process that imports torch without compiling (a data-loader worker) imported no more
    assert result == {"active": True, "namespace": "torch-test", "heavy": []}
