"""Where the compile phase goes, mode against mode, from a hot-load report's own processes (no new run).

    python benchmarks/diag/compile_steps.py benchmarks/results/gpu-h200 --model gpt2:infer

Every demo_model process records PyTorch's timers of its compile steps (``compile_steps``: seconds and calls
of its 30 longest, from ``torch._dynamo.utils.compilation_time_metrics``). This prints, per step, the median
seconds per process in each mode, sorted by how much longer castore-hot spent than warm-local. Steps nest (a
lookup runs inside the compile that asked for it), so the rows do not add up. Diagnostic only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

MODES = ["warm-local", "castore-hot", "castore-hot+rtt"]


def step_medians(runs: list[dict], model: str, mode: str) -> tuple[int, dict[str, float]]:
    """(processes, step -> median seconds per process); a step a process did not time counts as 0 there."""
    steps = [r["result"].get("compile_steps") or {} for r in runs if r.get("ok") and r["model"] == model and r["mode"] == mode]
    steps = [s for s in steps if s]
    names = set().union(*steps) if steps else set()
    return len(steps), {n: statistics.median([s.get(n, [0.0])[0] for s in steps]) for n in names}


def phase_medians(runs: list[dict], model: str, mode: str) -> dict[str, float]:
    """Median seconds per process of the phases, and of the CPU time of the process (all of it, then that of the
    threads it started: castore's and the others) and of its compile workers."""
    results = [r["result"] for r in runs if r.get("ok") and r["model"] == model and r["mode"] == mode]
    rows: dict[str, list[float]] = {}
    for res in results:
        first, imp, comp = res["seconds_to_first_output"], res["seconds_import"], res["seconds_compile"]
        cpu = res.get("cpu_seconds") or {}
        threads = cpu.get("threads")  # absent in reports from before it was recorded
        castore_threads = None if threads is None else sum(s for n, s in threads.items() if n.startswith("castore"))
        other_threads = None if threads is None else sum(s for n, s in threads.items() if not n.startswith("castore"))
        values = {"first output": first, "import": imp, "build": first - imp - comp, "compile": comp,
                  "cpu, process": cpu.get("self"), "cpu, castore's threads": castore_threads,
                  "cpu, other threads": other_threads, "cpu, descendants": cpu.get("descendants")}  # fmt: skip
        for name, value in values.items():
            if value is not None:
                rows.setdefault(name, []).append(value)
    return {name: statistics.median(values) for name, values in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a directory with hot_load.json")
    parser.add_argument("--model", required=True, help="model:phase, as in the report")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    with open(os.path.join(args.results, "hot_load.json")) as f:
        runs = json.load(f)["runs"]
    modes = args.modes.split(",")
    per_mode = {m: step_medians(runs, args.model, m) for m in modes}
    counts = {m: n for m, (n, _) in per_mode.items()}
    if not any(counts.values()):
        raise SystemExit(f"no process of {args.model} in {args.results} recorded compile_steps (older report?)")
    medians = {m: steps for m, (_, steps) in per_mode.items()}
    names = set().union(*medians.values())
    base, hot = medians.get("warm-local", {}), medians.get("castore-hot", {})
    rows = sorted(names, key=lambda n: -(hot.get(n, 0.0) - base.get(n, 0.0)))
    print("processes: " + ", ".join(f"{m} {n}" for m, n in counts.items()))
    phases = {m: phase_medians(runs, args.model, m) for m in modes}
    print("".join(f"{m[:16]:>17}" for m in modes) + "  phase (median seconds per process)")
    for name in dict.fromkeys(n for m in modes for n in phases[m]):
        print("".join(f"{phases[m].get(name, float('nan')):17.3f}" for m in modes) + f"  {name}")
    print()
    print("".join(f"{m[:16]:>17}" for m in modes) + "  step (median seconds per process)")
    for name in rows[: args.top]:
        print("".join(f"{medians[m].get(name, 0.0):17.3f}" for m in modes) + f"  {name}")


if __name__ == "__main__":
    main()
