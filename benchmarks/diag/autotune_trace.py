"""Run castore.bench.demo_model with PyTorch's autotuning entry points traced (GPU diagnosis).

    python benchmarks/diag/autotune_trace.py --trace-out trace.jsonl -- --model gpt2 --mode train --device cuda

Each call to CachingAutotuner.benchmark_all_configs / coordinate_descent_tuning / recheck_autotune_cache and
autotune_cache._load_cached_autotuning appends one JSON line: kernel name, configs, flags, the call site.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import traceback


def _cfg(c):  # noqa: ANN001, ANN202
    try:
        return {"kwargs": dict(c.kwargs), "w": c.num_warps, "s": c.num_stages, "coordesc": getattr(c, "found_by_coordesc", None)}
    except Exception:  # noqa: BLE001
        return repr(c)


def install(out: str) -> None:
    import torch._inductor.runtime.autotune_cache as ac
    import torch._inductor.runtime.triton_heuristics as th

    def emit(rec: dict) -> None:
        rec["pid"] = os.getpid()
        with open(out, "a") as f:
            f.write(json.dumps(rec, default=repr) + "\n")

    def where() -> list[str]:
        return [f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}" for f in traceback.extract_stack(limit=9)[:-2]]

    cls = th.CachingAutotuner
    for name in ("benchmark_all_configs", "coordinate_descent_tuning", "_dynamic_scale_rblock", "recheck_autotune_cache"):
        orig = getattr(cls, name, None)
        if orig is None:
            emit({"missing": name})
            continue

        def make(orig, name):  # noqa: ANN001, ANN202
            @functools.wraps(orig)
            def traced(self, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
                before = [_cfg(l.config) for l in getattr(self, "launchers", []) or []]
                comp = [_cfg(r.config) for r in getattr(self, "compile_results", []) or []]
                res = orig(self, *a, **kw)
                after = [_cfg(l.config) for l in getattr(self, "launchers", []) or []]
                comp_after = [_cfg(r.config) for r in getattr(self, "compile_results", []) or []]
                emit({
                    "call": name, "kernel": self.inductor_meta.get("kernel_name"), "heuristic": str(getattr(self, "heuristic_type", "")),
                    "n_configs": len(getattr(self, "configs", []) or []), "launchers_before": before, "launchers_after": after,
                    "compile_results": comp, "compile_results_after": comp_after,
                    "autotune_cache_info": getattr(self, "autotune_cache_info", None), "has_autotune_cache": getattr(self, "autotune_cache", None) is not None,
                    "where": where(),
                })
                return res
            return traced

        setattr(cls, name, make(orig, name))

    orig_load = ac._load_cached_autotuning

    @functools.wraps(orig_load)
    def load(best_config, configs_hash, configs, inductor_meta):  # noqa: ANN001, ANN202
        snapshot = dict(best_config) if isinstance(best_config, dict) else best_config
        res = orig_load(best_config, configs_hash, configs, inductor_meta)
        emit({"call": "_load_cached_autotuning", "kernel": inductor_meta.get("kernel_name"), "best": snapshot,
              "configs": [_cfg(c) for c in configs], "result": _cfg(res) if res is not None else None, "hash": configs_hash})
        return res

    ac._load_cached_autotuning = load


def main() -> None:
    argv = sys.argv[1:]
    out = argv[argv.index("--trace-out") + 1]
    rest = argv[argv.index("--") + 1:]
    install(out)
    from castore.bench import demo_model

    demo_model.main(rest)


if __name__ == "__main__":
    main()
