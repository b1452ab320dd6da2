"""Where a castore-hot process spends the time a warm-local one does not: imports, phase by phase.

    python benchmarks/diag/import_diff.py --model resnet50 --mode infer --device cuda --repeats 2

Runs one cold process (PyTorch's local caches) and one castore-cold process (populating a SeaweedFS bucket), then
alternates warm-local and castore-hot processes under PYTHONPROFILEIMPORTTIME. Prints, per mode, the medians of
the phases demo_model reports, castore's install and store-open times, and the modules only castore-hot imports,
by top-level package, with their import self time (all threads). Diagnostic only: no result is committed from it.
"""

from __future__ import annotations

import collections
import json
import os
import re
import statistics
import tempfile

from _demo import demo_argv, parse_model_args, print_phases, run_demo

from castore.bench.machines import castore_machine_env, plain_machine_env
from castore.testing.seaweedfs import SeaweedFS

_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def imports(stderr: str) -> dict[str, int]:
    """module -> self microseconds, from -X importtime output."""
    out: dict[str, int] = {}
    for line in stderr.splitlines():
        m = _LINE.match(line)
        if m:
            out[m.group(4)] = int(m.group(1))
    return out


def main() -> None:
    args = parse_model_args("cnn", "infer", repeats=(int, 2))
    work = tempfile.mkdtemp(prefix="castore-impdiff-")
    demo = demo_argv(args)
    results: dict[str, list[dict]] = collections.defaultdict(list)
    modules: dict[str, list[dict[str, int]]] = collections.defaultdict(list)
    with SeaweedFS() as sw:
        bucket = sw.create_bucket()

        def castore_env(root: str) -> dict[str, str]:
            return castore_machine_env(root, f"s3://{bucket}?endpoint={sw.endpoint}", "impdiff", sw.env())

        def run(name: str, argv: list[str], env: dict[str, str], profile: bool) -> None:
            if profile:
                env = dict(env, PYTHONPROFILEIMPORTTIME="1")
            r, stderr = run_demo(name, argv, env)
            if r is None:
                return
            results[name].append(r)
            if profile:
                modules[name].append(imports(stderr))
            print_phases(name, r)

        cold_root = os.path.join(work, "cold")
        cold_env = plain_machine_env(cold_root)
        run("cold", demo, cold_env, False)
        run("castore-cold", demo + ["--castore"], castore_env(os.path.join(work, "castore-cold")), False)
        for i in range(args.repeats):
            run("warm-local", demo, cold_env, True)
            run("castore-hot", demo + ["--castore"], castore_env(os.path.join(work, f"hot-{i}")), True)

    def med(name: str, get) -> float:  # noqa: ANN001
        values = [v for v in (get(r) for r in results[name]) if v is not None]
        return round(statistics.median(values), 3) if values else float("nan")

    for name in ("warm-local", "castore-hot"):
        print(json.dumps({
            "mode": name,
            "first_output": med(name, lambda r: r["seconds_to_first_output"]),
            "import": med(name, lambda r: r["seconds_import"]),
            "torch_import": med(name, lambda r: r["seconds_torch_import"]),
            "compile": med(name, lambda r: r["seconds_compile"]),
            "install": med(name, lambda r: (r.get("castore") or {}).get("install_seconds")),
            "store_open": med(name, lambda r: (r.get("castore") or {}).get("store_open_seconds")),
            "import_self_total_s": round(statistics.median(sum(m.values()) for m in modules[name]) / 1e6, 3) if modules[name] else None,
        }), flush=True)
    if modules["warm-local"] and modules["castore-hot"]:
        base = set().union(*modules["warm-local"])
        extra: dict[str, float] = collections.defaultdict(float)
        for m in modules["castore-hot"]:
            for mod, us in m.items():
                if mod not in base:
                    extra[mod.split(".")[0]] += us / len(modules["castore-hot"])
        print("only in castore-hot, by package (ms self, median-free mean):")
        for pkg, us in sorted(extra.items(), key=lambda kv: -kv[1])[:25]:
            print(f"  {pkg:30s} {us / 1000:8.1f}")


if __name__ == "__main__":
    main()
