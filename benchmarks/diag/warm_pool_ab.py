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
import subprocess
import tempfile

from _demo import demo_argv, parse_model_args

from castore.bench.hot_load import clean_env, machine_dirs


def main() -> None:
    args = parse_model_args("cnn", "infer", repeats=(int, 3))
    demo = demo_argv(args, "--fast-exit")
    env = clean_env()
    env.update(machine_dirs(tempfile.mkdtemp(prefix="castore-poolab-")))
    results: dict[str, list[dict]] = {"pool": [], "no-pool": []}

    def run(name: str, extra: dict[str, str]) -> None:
        done = subprocess.run(demo, env=dict(env, **extra), capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            print(name, "FAILED", done.stderr[-2000:], flush=True)
            return
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results.setdefault(name, []).append(r)
        print(name, r["seconds_to_first_output"], r["seconds_import"], r["seconds_compile"], flush=True)

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
