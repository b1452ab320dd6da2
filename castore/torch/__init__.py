"""torch.compile on castore: PyTorch's caches and compiled kernels served from the store.

    import castore.torch
    castore.torch.install()            # or: CASTORE_URL=s3://... castore run -- python train.py

Only this subpackage imports torch; it never touches S3 directly (the store does, for s3:// URLs).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

from castore.config import Config, load_config
from castore.logsetup import apply_log_setting
from castore.torch import switches
from castore.torch.import_hooks import Patches
from castore.torch.session import StoreSession
from castore.torch.switches import SWITCHES, TORCH_ENV  # noqa: F401 - part of this package's names

log = logging.getLogger("castore.torch")

AUTOINSTALL_ENV = "CASTORE_TORCH_AUTOINSTALL"
AUTOLOAD_DIR = os.path.join(os.path.dirname(__file__), "_autoload")
TRITON_CACHE_MANAGER = "castore.torch.triton_cache:CastoreTritonCacheManager"

_lock = threading.Lock()
_installing = threading.local()  # install() of this thread is importing torch
_active: dict[str, Any] = {}


def default_namespace() -> str:
    import torch

    return "torch-" + torch.__version__


def install(url: str | None = None, *, config: Config | None = None, namespace: str | None = None, **overrides: Any) -> StoreSession:
    """Serve torch.compile's caches from castore in this process and in the processes it starts.

    Idempotent: a second call returns the active session. Never raises for store problems: the store is
    opened lazily and every failure falls back to a normal compile.
    """
    with _lock:
        if "session" in _active:
            return _active["session"]
        started = time.monotonic()
        if config is None:
            config = load_config({"url": url, **overrides})
        apply_log_setting(config.log)
        _installing.active = True  # the autoload's hook runs inside this import: it must leave the install to us
        try:
            import torch  # noqa: F401 - the namespace names its version
        finally:
            _installing.active = False

        from castore.torch import artifacts, autotune_fixes, compile_activity, isa_probe, remote_caches, source_keys

        session = StoreSession(config, namespace or os.environ.get("CASTORE_NAMESPACE") or default_namespace())
        # Every patch waits for PyTorch to import its module (import_hooks): a process that imports torch but never
        # compiles (a data-loader worker) pays nothing for Dynamo and Inductor.
        patches = Patches()
        remote_caches.install(session, patches)
        switches.install(patches)  # before the environment is exported: it reads the user's opt-outs there
        artifacts.install(session, patches)
        autotune_fixes.install(session, patches)
        isa_probe.install(session, patches)
        compile_activity.install(session.write_gate, patches)
        source_keys.install(patches, os.path.join(config.cache_dir, "source-keys"), session.stats.source_keys)
        exported = job_environment(config, session.namespace)
        saved_env = {name: os.environ.get(name) for name, value in exported.items() if os.environ.get(name) != value}
        saved_path = list(sys.path)
        _export_environment(exported)
        session.prewarm()
        _active.update(session=session, patches=patches, saved_env=saved_env, saved_path=saved_path)
        session.stats.install_seconds = time.monotonic() - started
        log.info("castore: torch.compile caches served from %s (namespace %s)", config.url, session.namespace)
        return session


def uninstall() -> None:
    """Undo install() in this process (tests)."""
    with _lock:
        if "session" not in _active:
            return
        session: StoreSession = _active["session"]
        session.close()
        _active["patches"].undo()
        for name, value in _active["saved_env"].items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        sys.path[:] = _active["saved_path"]
        _active.clear()


def active_session() -> StoreSession | None:
    return _active.get("session")


def stats() -> dict[str, object]:
    """This process's counters: per cache and per layer (local layer, bucket)."""
    session = active_session()
    return session.stats.to_dict() if session else {}


def job_environment(config: Config, namespace: str | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment under which every Python process of a job serves torch.compile from castore."""
    env = dict(os.environ if base is None else base)
    switches.export(env)  # PyTorch's remote caches on, except those the user turned off
    # Triton's compile cache read through from the store; a manager the user chose is left alone.
    env.setdefault("TRITON_CACHE_MANAGER", TRITON_CACHE_MANAGER)
    for name, value, _ in config.describe():
        env["CASTORE_" + name.upper()] = str(int(value) if isinstance(value, bool) else value)
    if namespace:
        env["CASTORE_NAMESPACE"] = namespace
    env[AUTOINSTALL_ENV] = "1"
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != AUTOLOAD_DIR]
    env["PYTHONPATH"] = os.pathsep.join([AUTOLOAD_DIR, *paths])
    return env


def _export_environment(env: dict[str, str]) -> None:
    os.environ.update(env)
    # Inductor starts its compile workers with PYTHONPATH=os.pathsep.join(sys.path) (utils.python_subprocess_env),
    # not with the environment's PYTHONPATH: the folder must be on this process's sys.path too, ahead of the
    # standard library (which may hold the distribution's own sitecustomize).
    if AUTOLOAD_DIR not in sys.path:
        sys.path.insert(1 if sys.path else 0, AUTOLOAD_DIR)


def aot_compile(target: Any, example_args: Any = (), example_kwargs: dict[str, Any] | None = None, *,
                dynamic: bool | None = None, mode: str | None = None, options: dict[str, Any] | None = None) -> Any:
    """Load ``target``'s ahead-of-time compiled function from the store, or compile, publish and return it
    (castore.torch.precompiled.aot_compile: a fresh machine skips Dynamo's trace as well as Inductor)."""
    from castore.torch import precompiled

    return precompiled.aot_compile(target, example_args, example_kwargs, dynamic=dynamic, mode=mode, options=options)


def install_from_environment() -> StoreSession | None:
    """Called in processes started under castore (``castore run``, compile workers), right after torch's import;
    nothing to do when that import happened inside an install() of this thread (a script calling install()
    before importing torch), which goes on with its own arguments."""
    if getattr(_installing, "active", False):
        return None
    try:
        return install()
    except Exception as exc:  # noqa: BLE001 - never break the user's process
        log.warning("castore: could not install torch integration: %s", exc)
        return None


__all__ = ["StoreSession", "active_session", "aot_compile", "default_namespace", "install", "install_from_environment", "job_environment", "stats", "uninstall"]
