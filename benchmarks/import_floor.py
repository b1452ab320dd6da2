#!/usr/bin/env python
"""How much of a fresh process's start is Python imports, castore-aot (or castore-hot) against warm-local.

Each process runs castore.bench.demo_model under ``-X importtime`` (PYTHONPROFILEIMPORTTIME): the interpreter
reports every module's own import time (its body, the shared libraries it loads), wherever the import happens, in
the compile phase included. A warm-local process (PyTorch's caches filled by one cold run) and a fresh machine of
--mode alternate, pairs times: castore-aot loads the stored function from SeaweedFS (filled by one castore-aot-cold
run), castore-hot serves torch.compile's caches from it (filled by one castore-cold run). The report: per process, time to first output, import seconds and module count; per mode, the medians; and
the modules whose import only one mode pays. Import timing slows a process down: the times here are not those of
`castore bench`.

    .venv/bin/python benchmarks/import_floor.py --model mlp-autotune:infer --device cuda --pairs 3 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from castore.bench.machines import castore_machine_env, last_json, plain_machine_env, run_process  # noqa: E402
from castore.bench.modes import split_model_spec  # noqa: E402

LINE = re.compile(r"import time:\s+(-?\d+) \|\s+\d+ \|\s*(\S+)")


def import_lines(stderr: str) -> list[tuple[str, float]]:
    """(module, seconds of its own import) for each line the interpreter printed, in order."""
    return [(m.group(2), int(m.group(1)) / 1e6) for m in LINE.finditer(stderr)]


def module_times(lines: list[tuple[str, float]]) -> dict[str, float]:
    """Each module's own import seconds, at its first report (a later line of the same name is a thread that
    waited on another's import of it)."""
    times: dict[str, float] = {}
    for name, seconds in lines:
        times.setdefault(name, seconds)
    return times


def measure(python: str, args: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    env = dict(env, PYTHONPROFILEIMPORTTIME="1")
    rc, out, err, wall, error = run_process(python, args, env, timeout)
    result = last_json(out) or {}
    lines = import_lines(err)
    times = module_times(lines)
    # The total over every line: the interpreter keeps one account for all threads, so an import on castore's
    # threads during one on the main thread shifts seconds between their lines (some negative), not out of the sum.
    return {"ok": rc == 0 and bool(result), "error": error, "first_output_s": result.get("seconds_to_first_output"),
            "compile_s": result.get("seconds_compile"), "output_digest": result.get("output_digest"),
            "import_s": round(sum(s for _, s in lines), 3), "modules": len(times),
            "castore_modules": sum(1 for n in times if n.startswith("castore")), "times": times}  # fmt: skip


def only_in(mine: list[dict[str, float]], theirs: list[dict[str, float]], top: int = 15) -> dict[str, Any]:
    """The modules every process of one mode imported and no process of the other, by median own seconds (those
    imported on a thread beside the main thread's imports may show another's seconds)."""
    names = set.intersection(*(set(t) for t in mine)) - set.union(*(set(t) for t in theirs))
    seconds = {n: statistics.median(t[n] for t in mine) for n in names}
    largest = sorted(seconds.items(), key=lambda kv: -kv[1])[:top]
    return {"modules": len(names), "seconds": round(sum(seconds.values()), 3), "largest": [[n, round(s, 4)] for n, s in largest]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mlp-autotune:infer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", default="castore-aot", choices=["castore-aot", "castore-hot"], help="the mode set against warm-local")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from castore.testing.seaweedfs import SeaweedFS

    model, phase = split_model_spec(args.model)
    demo = ["--model", model, "--mode", phase, "--device", args.device, "--fast-exit"]
    python = sys.executable
    work = tempfile.mkdtemp(prefix="import-floor-")
    sw = SeaweedFS().start()
    try:
        bucket = sw.create_bucket(f"floor-{uuid.uuid4().hex[:12]}")
        url = f"s3://{bucket}?endpoint={sw.endpoint}"

        flag = "--aot" if args.mode == "castore-aot" else "--castore"

        def castore_env(name: str) -> dict[str, str]:
            return castore_machine_env(os.path.join(work, name), url, "floor", sw.env())

        cold_env = plain_machine_env(os.path.join(work, "cold"))
        writer = measure(python, demo + [flag], castore_env(f"{args.mode}-cold"), args.timeout)
        cold = measure(python, demo, cold_env, args.timeout)
        runs: dict[str, list[dict[str, Any]]] = {"warm-local": [], args.mode: []}
        for i in range(args.pairs):
            order = ["warm-local", args.mode] if i % 2 == 0 else [args.mode, "warm-local"]
            for mode in order:
                if mode == "warm-local":
                    runs[mode].append(measure(python, demo, cold_env, args.timeout))
                else:
                    runs[mode].append(measure(python, demo + [flag], castore_env(f"{mode}-{i}"), args.timeout))
    finally:
        sw.stop()
    ok = {mode: [r for r in rs if r["ok"]] for mode, rs in runs.items()}
    summary = {mode: {key: round(statistics.median(r[key] for r in rs), 3) for key in ("first_output_s", "compile_s", "import_s", "modules")}
               for mode, rs in ok.items() if rs}  # fmt: skip
    report: dict[str, Any] = {
        "benchmark": "import_floor", "model": args.model, "device": args.device, "mode": args.mode, "pairs": args.pairs,
        "summary": summary,
        "import_share": {mode: round(s["import_s"] / s["first_output_s"], 3) for mode, s in summary.items()},
        "digests_match": {"warm-local": all(r["output_digest"] == cold["output_digest"] for r in ok["warm-local"]),
                          args.mode: all(r["output_digest"] == writer["output_digest"] for r in ok[args.mode])},
        "only_" + args.mode.replace("-", "_"): only_in([r["times"] for r in ok[args.mode]], [r["times"] for r in ok["warm-local"]]),
        "only_warm_local": only_in([r["times"] for r in ok["warm-local"]], [r["times"] for r in ok[args.mode]]),
        "processes": {mode: [{k: v for k, v in r.items() if k != "times"} for r in rs] for mode, rs in runs.items()},
        "writer": {k: v for k, v in writer.items() if k != "times"}, "cold": {k: v for k, v in cold.items() if k != "times"},
    }  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "import_floor.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: report[k] for k in ("summary", "import_share", "digests_match")}, indent=1))
    draw(report, os.path.join(args.out, "import_floor.png"))


def draw(report: dict[str, Any], path: str) -> None:
    """Per mode: median import seconds and the rest of the time to first output, stacked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no chart: matplotlib is not installed", file=sys.stderr)
        return
    modes = list(report["summary"])
    imports = [report["summary"][m]["import_s"] for m in modes]
    rest = [report["summary"][m]["first_output_s"] - report["summary"][m]["import_s"] for m in modes]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(modes, imports, label="imports (own time of every module)")
    ax.bar(modes, rest, bottom=imports, label="everything else")
    ax.set_ylabel("seconds to first output (median)")
    ax.set_title(f"{report['model']} on {report['device']}, under -X importtime")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
