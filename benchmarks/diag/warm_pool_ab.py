"""What Inductor's compile-worker pool costs a warm start that compiles nothing: warm-local with and without it.

    python benchmarks/diag/warm_pool_ab.py --model gpt2 --mode infer --device cuda --repeats 4

Inductor starts its pool of compile workers (each a Python process importing torch and Triton) at the first
compile of a process, before it knows whether its caches will hit. One cold process fills PyTorch's local
caches; then warm-local processes alternate with and without TORCH_WARM_POOL=0. Prints each process's phases
and the medians. Diagnostic only: no result is committed from it.
"""

from __future__ import annotations

import json
import statistics
import tempfile

from _demo import demo_argv, parse_model_args, print_phases, run_demo

from castore.bench.machines import plain_machine_env


def main() -> None:
    args = parse_model_args("cnn", "infer", repeats=(int, 3))
    demo = demo_argv(args, "--fast-exit")
    env = plain_machine_env(tempfile.mkdtemp(prefix="castore-poolab-"))
    results: dict[str, list[dict]] = {"pool": [], "no-pool": []}

    def run(name: str, extra: dict[str, str]) -> None:
        r, _ = run_demo(name, demo, dict(env, **extra))
        if r is not None:
            results.setdefault(name, []).append(r)
            print_phases(name, r)

    run("cold", {})
    for _ in range(args.repeats):
        run("pool", {})
        run("no-pool", {"TORCH_WARM_POOL": "0"})
    for name in ("pool", "no-pool"):
        rs = results[name]
        if rs:
            print(json.dumps({
                "mode": name,
                "first_output": round(statistics.median(r["seconds_to_first_output"] for r in rs), 3),
                "compile": round(statistics.median(r["seconds_compile"] for r in rs), 3),
                "triton_compiles": [r.get("triton_compiles") for r in rs],
            }), flush=True)


if __name__ == "__main__":
    main()
