"""Autotuning that a warm start repeats although the answer is already known.

Measured with torch 2.11 on an H100 (1 to 3: benchmarks/results/gpu-h100/autotune_trace/) and an H200 (4), four
gaps in Inductor's own autotune cache make a warm start (PyTorch's local cache or castore's bucket alike) benchmark
again:

1. ``CachingAutotuner.recheck_autotune_cache`` (FX-cache hits of statically launchable kernels) ignores an
   autotune-cache hit when the kernel was compiled with a single config, and drops ``found_by_coordesc`` when
   the winner is one of the compiled configs. With ``coordinate_descent_tuning`` every such kernel is tuned
   again (pytorch#172819; fixed upstream by pytorch#173391 / #181789, not in 2.11). castore installs the fixed
   method when, and only when, the running torch has the old one.
2. ``_dynamic_scale_rblock`` adds configs to a kernel that the autotune cache has already narrowed to its winner
   (also fixed upstream by #181789). castore skips it after a hit, as newer torch does.
3. A reduction kernel generated with a single config has no autotune cache at all; ``_dynamic_scale_rblock``
   then adds a smaller-RBLOCK variant at load time and ``autotune_to_one_config`` benchmarks both on every start,
   in every torch version. castore records that winner in the store (cache ``autotune-winner``), keyed by the
   kernel's source file, its candidate configs, the GPU and the versions, and reuses it.
4. A kernel compiled after an autotune-cache hit (its winner stored by an earlier process) holds the winner alone,
   and so does its copy in the FX or ahead-of-time entry that process writes. Reloaded from that entry, the recheck
   of every torch version hashes the one config it holds and looks under a key the winner was not stored under,
   and Triton's Config loses ``found_by_coordesc`` in the copy: coordinate descent ran again on every start (a
   max-autotune MLP's ahead-of-time start on an H200: 2 s of it). castore reads the winner through the kernel's
   own autotune cache, which still holds the hash of all its candidates.

Each patch is a no-op where PyTorch already does the right thing; ``uninstall`` restores the originals.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

from castore.torch.import_hooks import Patches
from castore.torch.session import StoreSession

log = logging.getLogger("castore.torch")

WINNER_CACHE = "autotune-winner"

counters = {"winner_hits": 0, "winner_puts": 0, "rechecks_fixed": 0, "rechecks_own_cache": 0}


def _config_tuple(kwargs: dict[str, Any], num_warps: Any, num_stages: Any) -> tuple[Any, ...]:
    """A Triton config as a comparable value: a stored record and a live Config give the same tuple."""
    return (tuple(sorted((str(k), repr(v)) for k, v in kwargs.items())), num_warps, num_stages)


def _launcher_tuple(launcher: Any) -> tuple[Any, ...]:
    config = launcher.config
    return _config_tuple(config.kwargs, config.num_warps, config.num_stages)


def winner_key(autotuner: Any) -> str | None:
    """Store key for the winner among an autotuner's current launchers, or None if it cannot be named."""
    filename = getattr(autotuner, "filename", None)
    launchers = getattr(autotuner, "launchers", None) or []
    if not filename or len(launchers) < 2:
        return None
    try:
        import torch

        props = autotuner.device_props
        device = (getattr(props, "type", "?"), getattr(props, "name", None) or "", getattr(props, "major", None), getattr(props, "minor", None))
        try:
            import triton

            triton_version = triton.__version__
        except Exception:  # noqa: BLE001
            triton_version = "none"
        material = repr((
            os.path.basename(filename),  # Inductor names a kernel's file by the hash of its source
            autotuner.inductor_meta.get("kernel_name"),
            sorted(_launcher_tuple(l) for l in launchers),
            device,
            torch.__version__,
            triton_version,
        ))
    except Exception:  # noqa: BLE001 - an autotuner of another shape: leave it to PyTorch
        return None
    return "winner." + hashlib.sha256(material.encode()).hexdigest()


def install(session: StoreSession, patches: Patches) -> None:
    """Install the patches that apply to the running torch when Inductor's Triton runtime is imported."""
    patches.on_import("torch._inductor.runtime.triton_heuristics", lambda th: _patch_autotuner(session, patches, th))


def _patch_autotuner(session: StoreSession, patches: Patches, th: ModuleType) -> None:
    cls = th.CachingAutotuner

    def patch(name: str, replacement: Any) -> None:
        patches.replace(cls, name, replacement)

    # 1. recheck_autotune_cache: first through the kernel's own autotune cache; then the fixed method where the
    #    running torch still has the single-config guard, else PyTorch's.
    original_recheck = cls.__dict__.get("recheck_autotune_cache")
    if original_recheck is not None:
        base_recheck = original_recheck
        needed = ("check_autotune_cache", "triton_config_to_hashable", "dynamo_timed")
        if _has_single_config_guard(original_recheck) and all(hasattr(th, n) for n in needed):

            def fixed_recheck(self: Any, reload_kernel_from_src: Callable[[], Any]) -> None:
                configs = [result.config for result in self.compile_results]
                cached, _, info = th.check_autotune_cache(configs, self.filename, self.inductor_meta)
                self.autotune_cache_info = info
                if len(cached) != 1 or info.get("autotune_cache_state") != "hit":
                    return
                counters["rechecks_fixed"] += 1
                _narrow_to_best(th, self, cached[0], reload_kernel_from_src)

            base_recheck = fixed_recheck
            log.debug("castore: using the fixed CachingAutotuner.recheck_autotune_cache (pytorch#172819)")

        def recheck_autotune_cache(self: Any, reload_kernel_from_src: Callable[[], Any]) -> None:
            best = _best_in_own_cache(th, self)
            if best is not None:
                counters["rechecks_own_cache"] += 1
                _narrow_to_best(th, self, best, reload_kernel_from_src)
                return None
            return base_recheck(self, reload_kernel_from_src)

        patch("recheck_autotune_cache", recheck_autotune_cache)

    # 2. No rblock scaling after an autotune-cache hit.
    original_scale = cls.__dict__.get("_dynamic_scale_rblock")
    if original_scale is not None:

        def _dynamic_scale_rblock(self: Any) -> Any:
            info = getattr(self, "autotune_cache_info", None) or {}
            if info.get("autotune_cache_state") == "hit":
                return None
            return original_scale(self)

        patch("_dynamic_scale_rblock", _dynamic_scale_rblock)

    # 3. Winners of kernels PyTorch keeps no autotune cache for.
    original_one = cls.__dict__.get("autotune_to_one_config")
    if original_one is not None:

        def autotune_to_one_config(self: Any, *args: Any, **kwargs: Any) -> Any:
            key = None if getattr(self, "save_cache_hook", None) else winner_key(self)
            if key is None:
                return original_one(self, *args, **kwargs)
            chosen = _stored_winner(session, key, self.launchers)
            if chosen is not None:
                _narrow_to(self, chosen)
                counters["winner_hits"] += 1
                return None
            result = original_one(self, *args, **kwargs)
            if len(self.launchers) == 1:
                config = self.launchers[0].config
                record = {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}
                try:
                    session.put(WINNER_CACHE, key, json.dumps(record, sort_keys=True).encode())
                    counters["winner_puts"] += 1
                except TypeError:  # a config value JSON cannot hold: not worth a record
                    pass
            return result

        patch("autotune_to_one_config", autotune_to_one_config)


def _best_in_own_cache(th: ModuleType, autotuner: Any) -> Any | None:
    """The winner stored for a kernel whose compiled configs are not its candidates, read through its own cache.

    A kernel built after an autotune-cache hit is compiled with the winner alone, and so is its copy in an FX or
    ahead-of-time entry. Reloaded from there, PyTorch's recheck hashes that one config and looks under a key the
    winner was never stored under (the hash of all the candidates, which the kernel's own AutotuneCache, its save
    hook, still holds); Triton's Config also loses ``found_by_coordesc`` in the copy, so coordinate descent ran
    again on every start. None where the two hashes agree (PyTorch's recheck looks in the right place)."""
    cache = getattr(getattr(autotuner, "save_cache_hook", None), "__self__", None)
    own_hash = getattr(cache, "configs_hash", None)
    results = getattr(autotuner, "compile_results", None) or []
    if not isinstance(own_hash, str) or not results or not callable(getattr(cache, "read_best", None)):
        return None
    configs = [result.config for result in results]
    try:
        if own_hash == th.hash_configs(configs):
            return None
        return cache.read_best(autotuner.inductor_meta, configs)
    except Exception as exc:  # noqa: BLE001 - a cache of another shape: PyTorch's own recheck runs
        log.debug("castore: reading a kernel's own autotune cache failed: %r", exc)
        return None


def _narrow_to_best(th: ModuleType, autotuner: Any, best: Any, reload_kernel_from_src: Callable[[], Any]) -> None:
    """What the fixed recheck does with a hit: keep the compiled config that won (with found_by_coordesc, so no
    coordinate descent runs), or compile the winner when it was found after the entry was written."""
    found_by_coordesc = getattr(best, "found_by_coordesc", False)
    best_hash = th.triton_config_to_hashable(best)
    autotuner.autotune_cache_info = {**(getattr(autotuner, "autotune_cache_info", None) or {}),
                                     "autotune_cache_state": "hit", "best_config": best_hash}  # fmt: skip
    for result in autotuner.compile_results:
        if th.triton_config_to_hashable(result.config) == best_hash:
            result.config.found_by_coordesc = found_by_coordesc
            autotuner.compile_results = [result]
            return
    # The winner was found after the entry was written (coordesc, rblock scaling): compile it. Triton's cache
    # (castore's Triton cache manager behind it) usually holds it already.
    with th.dynamo_timed("CachingAutotuner.slow_precompile_config"):
        if autotuner.fn.fn is None:
            autotuner.fn = reload_kernel_from_src().fn
        autotuner.compile_results = [autotuner._precompile_config(best)]


def _has_single_config_guard(method: Any) -> bool:
    """True for torch versions whose recheck_autotune_cache skips hits of single-config kernels (pytorch#172819)."""
    try:
        source = inspect.getsource(method)
    except (OSError, TypeError):
        return False
    return "len(configs) > 1" in source and "found_by_coordesc = found_by_coordesc" not in source


def _narrow_to(autotuner: Any, launcher: Any) -> None:
    """What autotune_to_one_config does once it has a winner, in the versions that have each step."""
    release = getattr(autotuner, "_release_static_launchers_except", None)
    if release is not None:
        release(launcher)
    autotuner.launchers = [launcher]
    prune = getattr(autotuner, "_prune_compile_results_to_launcher", None)
    if prune is not None:
        prune(launcher)
    autotuner.autotune_time_taken_ns = getattr(autotuner, "precompile_time_taken_ns", 0)
    try:
        from torch._inductor.triton_bundler import TritonBundler

        if hasattr(TritonBundler, "put_winner") and getattr(launcher, "cache_hash", None):
            TritonBundler.put_winner(launcher.cache_hash)
    except ImportError:
        pass


def _stored_winner(session: StoreSession, key: str, launchers: list[Any]) -> Any | None:
    data = session.get(WINNER_CACHE, key)
    if data is None:
        return None
    try:
        record = json.loads(data)
        wanted = _config_tuple(dict(record["kwargs"]), record["num_warps"], record["num_stages"])
    except (ValueError, KeyError, TypeError, AttributeError):
        log.warning("castore: ignoring a malformed autotune winner record %s", key)
        return None
    for launcher in launchers:
        if _launcher_tuple(launcher) == wanted:
            return launcher
    return None  # the candidates changed: benchmark as PyTorch would
