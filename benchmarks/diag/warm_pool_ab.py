"""What Inductor's compile-worker pool costs a warm start that compiles nothing: warm-local with and without it.

    python benchmarks/diag/warm_pool_ab.py --model gpt2 --mode infer --device cuda --repeats 4

Inductor starts its pool of compile workers (each a Python process importing torch and Triton) at the first
compile of a process, before it knows whether its caches will hit. One cold process fills PyTorch's local
caches; then warm-local processes alternate with and without TORCH_WARM_POOL=0. Prints each process's phases
and the medians. Diagnostic only: no result is committed from it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

from castore.bench.hot_load import clean_env, machine_dirs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--mode", default="infer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    demo = [sys.executable, "-m", "castore.torch.demo_model", "--model", args.model, "--mode", args.mode,
            "--device", args.device, "--fast-exit"]
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
