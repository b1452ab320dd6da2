"""castore's fixes for autotuning a warm start repeats (castore/torch/autotune_fixes.py).

The GPU proof (no autotune call on a fresh machine, counted) is in benchmarks/results/gpu-h100/. Here, on CPU,
PyTorch's real CachingAutotuner methods run on an autotuner whose compiled launchers are stand-ins: Triton
cannot compile on this machine, and what is tested is which launcher wins and whether benchmarking happens.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("torch")

import torch._inductor.runtime.triton_heuristics as th  # noqa: E402

from castore.config import load_config  # noqa: E402
from castore.torch import autotune_fixes, remote_caches  # noqa: E402
from castore.torch.import_hooks import Patches  # noqa: E402
from castore.torch.session import StoreSession  # noqa: E402


def _session(root: Path, url: str) -> StoreSession:
    return StoreSession(load_config({"url": url, "cache_dir": str(root / "castore")}, env={}), "torch-test")


class Launcher:
    """A compiled config as CachingAutotuner holds it (hashable by identity, like Inductor's launcher functions)."""

    def __init__(self, rblock: int, warps: int) -> None:
        self.config = SimpleNamespace(kwargs={"XBLOCK": 1, "R0_BLOCK": rblock}, num_warps=warps, num_stages=1)
        self.cache_hash = f"hash{rblock}"
        self.n_regs, self.n_spills, self.shared = 32, 0, 0


def _launcher(rblock: int, warps: int = 8) -> Launcher:
    return Launcher(rblock, warps)


def _reduction_autotuner(launchers: list[Launcher], timings: dict[int, float], benchmarks: list[int]) -> Any:
    """A single-config reduction kernel after _dynamic_scale_rblock added a smaller-RBLOCK variant."""
    autotuner = object.__new__(th.CachingAutotuner)
    autotuner.filename = "/tmp/inductor/ab/cabcdef0123456789.py"
    autotuner.inductor_meta = {"kernel_name": "triton_red_fused_nll_loss_backward_0"}
    autotuner.device_props = SimpleNamespace(type="cuda", name="NVIDIA H100 80GB HBM3", major=9, minor=0)
    autotuner.save_cache_hook = None  # PyTorch keeps no autotune cache for a single-config kernel
    autotuner.launchers = list(launchers)
    autotuner.compile_results = []
    autotuner.precompile_time_taken_ns = 0
    autotuner.fn = SimpleNamespace(__name__="triton_red_fused_nll_loss_backward_0")
    autotuner.benchmark_failure_reasons = {}

    def benchmark_all_configs(*args: Any, **kwargs: Any) -> dict[Any, float]:
        benchmarks.append(1)
        return {l: timings[l.config.kwargs["R0_BLOCK"]] for l in autotuner.launchers}

    autotuner.benchmark_all_configs = benchmark_all_configs
    return autotuner


def _machine(tmp_path: Path, name: str, url: str, undo: list[Patches]) -> StoreSession:
    """A process of a fresh machine: its own local layer, castore's fixes and remote caches installed (the previous
    process's patches undone)."""
    for patches in undo:
        patches.undo()
    undo.clear()
    session = _session(tmp_path / name, url)
    patches = Patches()
    autotune_fixes.install(session, patches)
    remote_caches.install(session, patches)
    undo.append(patches)
    return session


@pytest.fixture
def installed(tmp_path: Path) -> Any:
    undo: list[Patches] = []
    yield lambda name, url: _machine(tmp_path, name, url, undo)
    for patches in undo:
        patches.undo()


def test_a_fresh_machine_reuses_the_winner_pytorch_keeps_no_cache_for(tmp_path: Path, s3_url: str, installed: Any) -> None:
    timings = {1024: 2.0, 512: 1.0}
    benchmarks: list[int] = []
    first = installed("a", s3_url)
    tuner = _reduction_autotuner([_launcher(1024), _launcher(512)], timings, benchmarks)
    tuner.autotune_to_one_config()
    assert len(benchmarks) == 1 and tuner.launchers[0].config.kwargs["R0_BLOCK"] == 512
    assert first.flush(30) and first.stats.caches["autotune-winner"].puts == 1

    installed("b", s3_url)  # empty local layer, same bucket
    # Timings that would now pick the other config prove the stored winner is used, not a new benchmark.
    fresh = _reduction_autotuner([_launcher(1024), _launcher(512)], {1024: 1.0, 512: 2.0}, benchmarks)
    fresh.autotune_to_one_config()
    assert len(benchmarks) == 1, "the fresh machine benchmarked again"
    assert [l.config.kwargs["R0_BLOCK"] for l in fresh.launchers] == [512]


def test_changed_candidates_or_another_gpu_benchmark_again(tmp_path: Path, installed: Any) -> None:
    url = f"file://{tmp_path}/bucket"
    benchmarks: list[int] = []
    session = installed("a", url)
    _reduction_autotuner([_launcher(1024), _launcher(512)], {1024: 2.0, 512: 1.0}, benchmarks).autotune_to_one_config()
    assert session.flush(30)

    other_candidates = _reduction_autotuner([_launcher(1024, warps=16), _launcher(512)], {1024: 2.0, 512: 1.0}, benchmarks)
    other_candidates.autotune_to_one_config()
    assert len(benchmarks) == 2

    other_gpu = _reduction_autotuner([_launcher(1024), _launcher(512)], {1024: 2.0, 512: 1.0}, benchmarks)
    other_gpu.device_props = SimpleNamespace(type="cuda", name="NVIDIA A100-SXM4-80GB", major=8, minor=0)
    other_gpu.autotune_to_one_config()
    assert len(benchmarks) == 3


def test_kernels_with_pytorch_s_own_autotune_cache_are_left_to_it(tmp_path: Path, installed: Any) -> None:
    session = installed("a", f"file://{tmp_path}/bucket")
    benchmarks: list[int] = []
    saved: list[Any] = []
    tuner = _reduction_autotuner([_launcher(1024), _launcher(512)], {1024: 2.0, 512: 1.0}, benchmarks)
    tuner.save_cache_hook = lambda config, *a, **kw: saved.append(config)
    tuner.autotune_to_one_config()
    assert session.flush(30)
    assert len(saved) == 1 and session.stats.caches["autotune-winner"].puts == 0


def test_a_malformed_winner_record_is_a_miss(tmp_path: Path, installed: Any) -> None:
    session = installed("a", f"file://{tmp_path}/bucket")
    benchmarks: list[int] = []
    tuner = _reduction_autotuner([_launcher(1024), _launcher(512)], {1024: 2.0, 512: 1.0}, benchmarks)
    key = autotune_fixes.winner_key(tuner)
    assert key is not None
    session.put("autotune-winner", key, b"{not json")
    assert session.flush(30)
    tuner.autotune_to_one_config()
    assert len(benchmarks) == 1 and tuner.launchers[0].config.kwargs["R0_BLOCK"] == 512


def test_rblock_scaling_is_skipped_after_an_autotune_cache_hit(tmp_path: Path, installed: Any) -> None:
    installed("a", f"file://{tmp_path}/bucket")
    tuner = object.__new__(th.CachingAutotuner)
    tuner.autotune_cache_info = {"autotune_cache_state": "hit"}
    tuner.compile_results = ["winner"]
    assert tuner._dynamic_scale_rblock() is None
    assert tuner.compile_results == ["winner"]


class TritonConfig:
    """Triton's Config as Inductor's autotune cache uses it (Triton cannot be imported here). Like Triton's, a copy
    made by pickle keeps only its own fields: an attribute Inductor set on it (found_by_coordesc) is lost."""

    def __init__(self, kwargs: dict[str, Any], num_warps: int = 4, num_stages: int = 1, **_: Any) -> None:
        self.kwargs, self.num_warps, self.num_stages = dict(kwargs), num_warps, num_stages

    def __getstate__(self) -> dict[str, Any]:
        return {"kwargs": self.kwargs, "num_warps": self.num_warps, "num_stages": self.num_stages}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]


def test_a_kernel_built_from_an_autotune_hit_finds_its_winner_when_reloaded(s3_url: str, installed: Any, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Machine A tunes a kernel (coordinate descent) and stores the winner. Machine B compiles the same kernel
    later: its autotune-cache hit builds it with the winner alone, and that autotuner is what B's FX or
    ahead-of-time entry carries. Machine C loads the entry: the winner must be found, marked as coordinate
    descent's, so that C does not tune again."""
    import pickle

    import torch._inductor.runtime.autotune_cache as autotune_cache

    monkeypatch.setattr(autotune_cache, "Config", TritonConfig)  # what a stored winner is rebuilt as
    meta = {"coordinate_descent_tuning": True, "autotune_remote_cache": True, "autotune_local_cache": True,
            "backend_hash": "b" * 64, "kernel_name": "triton_per_fused_add_0"}  # fmt: skip
    candidates = [TritonConfig({"XBLOCK": 128, "R0_BLOCK": 8}, 4)]
    winner = TritonConfig({"XBLOCK": 64, "R0_BLOCK": 16}, 8)  # found by coordinate descent: not a candidate
    kernel_file = "cq7xkzr3vbkq4bthv2dhq4q2vy5l6q3vbjd5wtimvxgrwiyocsyu.py"  # named by its source's hash

    a = installed("a", s3_url)
    tuned = autotune_cache.AutotuneCache.create(meta, str(tmp_path / "a-inductor" / "cq" / kernel_file),
                                                th.hash_configs(candidates))  # fmt: skip
    assert tuned is not None
    tuned.save(winner, 1_000_000, found_by_coordesc=True)
    assert a.flush(30)

    installed("b", s3_url)
    configs, own_cache, info = th.check_autotune_cache(candidates, str(tmp_path / "b-inductor" / "cq" / kernel_file), meta)
    assert info["autotune_cache_state"] == "hit" and len(configs) == 1 and own_cache is not None
    compiled = object.__new__(th.StaticTritonCompileResult)  # a statically launchable kernel's result
    compiled.config = configs[0]
    built = object.__new__(th.CachingAutotuner)
    built.__dict__.update(filename=str(tmp_path / "b-inductor" / "cq" / kernel_file), inductor_meta=meta,
                          compile_results=[compiled], save_cache_hook=own_cache.save, autotune_cache_info=info,
                          launchers=[])  # fmt: skip
    entry = pickle.dumps(built)  # the copy B's FX or ahead-of-time entry carries

    installed("c", s3_url)
    loaded = pickle.loads(entry)
    assert not getattr(loaded.compile_results[0].config, "found_by_coordesc", False)  # lost in the copy
    before = autotune_fixes.counters["rechecks_own_cache"]
    loaded.recheck_autotune_cache(reload_kernel_from_src=lambda: pytest.fail("the winner was compiled already"))
    (kept,) = loaded.compile_results
    assert th.triton_config_to_hashable(kept.config) == th.triton_config_to_hashable(winner)
    assert kept.config.found_by_coordesc is True, "coordinate descent would run again on this machine"
    assert loaded.autotune_cache_info["autotune_cache_state"] == "hit"
    assert autotune_fixes.counters["rechecks_own_cache"] == before + 1


def test_a_kernel_compiled_with_all_its_candidates_is_rechecked_by_pytorch(tmp_path: Path, installed: Any) -> None:
    """Where the compiled configs are the candidates, PyTorch's recheck looks under the right key: castore does
    not read the kernel's cache a second time."""
    installed("a", f"file://{tmp_path}/bucket")
    candidates = [TritonConfig({"XBLOCK": 64}, 4), TritonConfig({"XBLOCK": 128}, 4)]
    reads: list[int] = []
    own = SimpleNamespace(configs_hash=th.hash_configs(candidates), read_best=lambda *a: reads.append(1))
    tuner = object.__new__(th.CachingAutotuner)
    tuner.__dict__.update(compile_results=[SimpleNamespace(config=c) for c in candidates],
                          save_cache_hook=SimpleNamespace(__self__=own), inductor_meta={})  # fmt: skip
    assert autotune_fixes._best_in_own_cache(th, tuner) is None and reads == []


OLD_RECHECK = '''
def recheck_autotune_cache(self, reload_kernel_from_src):
    configs = [result.config for result in self.compile_results]
    (cached_configs, _, autotune_cache_info) = check_autotune_cache(configs, self.filename, self.inductor_meta)
    if len(cached_configs) == 1 and len(configs) > 1:
        best_config = cached_configs[0]
'''


def test_the_recheck_fix_applies_only_to_torch_versions_that_need_it(tmp_path: Path) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(OLD_RECHECK, "old_triton_heuristics.py", "exec"), namespace)  # noqa: S102 - a fixed snippet
    import linecache

    linecache.cache["old_triton_heuristics.py"] = (len(OLD_RECHECK), None, OLD_RECHECK.splitlines(True), "old_triton_heuristics.py")
    assert autotune_fixes._has_single_config_guard(namespace["recheck_autotune_cache"])
    # The torch under test (2.13) has the upstream fix: a kernel castore's own-cache read has no answer for is
    # rechecked by PyTorch's method, not castore's fixed one.
    original = th.CachingAutotuner.__dict__["recheck_autotune_cache"]
    assert not autotune_fixes._has_single_config_guard(original)
    calls: list[Any] = []

    def upstream_recheck(self: Any, reload_kernel_from_src: Any) -> None:
        calls.append(self)

    th.CachingAutotuner.recheck_autotune_cache = upstream_recheck
    patches = Patches()
    try:
        autotune_fixes.install(_session(tmp_path, f"file://{tmp_path}/bucket"), patches)
        assert th.CachingAutotuner.__dict__["recheck_autotune_cache"] is not upstream_recheck
        tuner = object.__new__(th.CachingAutotuner)
        tuner.save_cache_hook = None  # no autotune cache of its own
        tuner.recheck_autotune_cache(lambda: None)
        assert calls == [tuner]
    finally:
        patches.undo()
        th.CachingAutotuner.recheck_autotune_cache = original


def test_uninstall_restores_pytorch_s_methods(tmp_path: Path) -> None:
    before = {n: th.CachingAutotuner.__dict__[n] for n in ("autotune_to_one_config", "_dynamic_scale_rblock")}
    patches = Patches()
    autotune_fixes.install(_session(tmp_path, f"file://{tmp_path}/bucket"), patches)
    assert th.CachingAutotuner.__dict__["autotune_to_one_config"] is not before["autotune_to_one_config"]
    patches.undo()
    assert {n: th.CachingAutotuner.__dict__[n] for n in before} == before
    json.dumps(autotune_fixes.counters)
