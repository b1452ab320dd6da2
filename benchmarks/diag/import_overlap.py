"""How much of importing Dynamo and Inductor a background thread can hide behind a model's build.

    python benchmarks/diag/import_overlap.py --models gpt2:train resnet50:infer --device cuda --rounds 3

Each round starts one process per way, alternated: ``serial`` imports torch, builds the model (weights moved to the
device) and then imports what a compile needs; ``overlap`` starts those imports on a thread right after torch's import
and joins it after the build. Prints, per model and way, the median seconds from process start to "ready to
compile", to "built", and the paired overlap/serial ratio. Also prints how many of the compiler's modules have
bytecode here and whether this Python may write it (castore.torch.bytecode; without it every import compiles its
source). Diagnostic only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, sys, threading, time
way, model, phase, device = sys.argv[1:5]
import torch
t_torch = time.time()
NEEDED = ["torch._dynamo", "torch._inductor.compile_fx", "torch._inductor.codegen.wrapper",
          "torch._inductor.codegen.memory_planning", "torch._inductor.select_algorithm", "torch._inductor.async_compile"]
if device.startswith("cuda"):
    NEEDED += ["triton", "triton.language", "torch._inductor.runtime.triton_heuristics"]
def warm():
    import importlib
    for name in NEEDED:
        importlib.import_module(name)
worker = None
if way == "overlap":
    worker = threading.Thread(target=warm, daemon=True)
    worker.start()
from castore.bench.models import build_runs
net, examples = build_runs(model, phase, device)
if device.startswith("cuda"):
    torch.cuda.synchronize()
t_built = time.time()
if worker is not None:
    worker.join()
else:
    warm()
t_ready = time.time()
print(json.dumps({"torch": t_torch, "built": t_built, "ready": t_ready}), flush=True)
"""


def bytecode_state() -> dict[str, object]:
    """This interpreter's bytecode for the compiler's packages (castore.torch.bytecode, what castore doctor checks),
    and the seconds three fresh processes took to import Dynamo and Inductor."""
    from castore.torch import bytecode

    state: dict[str, object] = {
        "python": sys.version.split()[0],
        "dont_write_bytecode": sys.flags.dont_write_bytecode,
        "packages": {s.package: {"modules": s.modules, "cached": s.cached, "writable": s.writable} for s in bytecode.compiler_bytecode()},
    }
    times = []
    for _ in range(3):
        t0 = time.time()
        subprocess.run([sys.executable, "-c", "import torch._dynamo, torch._inductor.compile_fx"], check=False)
        times.append(round(time.time() - t0, 2))
    state["import_dynamo_inductor_s"] = times
    return state


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["cnn:infer"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args()
    report: dict[str, object] = {"bytecode": bytecode_state()}
    print(json.dumps(report["bytecode"]), flush=True)
    for spec in args.models:
        model, _, phase = spec.partition(":")
        rows: dict[str, list[dict[str, float]]] = {"serial": [], "overlap": []}
        for i in range(args.rounds):
            ways = ["serial", "overlap"] if i % 2 == 0 else ["overlap", "serial"]
            for way in ways:
                t0 = time.time()
                out = subprocess.run([sys.executable, "-c", CHILD, way, model, phase or "infer", args.device],
                                     capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    print(f"{spec} {way}: failed: {out.stderr[-800:]}", flush=True)
                    continue
                t = json.loads(out.stdout.strip().splitlines()[-1])
                rows[way].append({k: round(v - t0, 3) for k, v in t.items()})
                print(spec, way, rows[way][-1], flush=True)
        pairs = [o["ready"] / s["ready"] for s, o in zip(rows["serial"], rows["overlap"])]
        summary = {way: {k: statistics.median(r[k] for r in rs) for k in ("torch", "built", "ready")} for way, rs in rows.items() if rs}
        summary["overlap_over_serial"] = round(statistics.median(pairs), 3) if pairs else None
        report[spec] = {"runs": rows, "summary": summary}
        print(spec, json.dumps(summary), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
