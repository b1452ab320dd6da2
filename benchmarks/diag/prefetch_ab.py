"""Whether the fetch plan's prefetch slows a fresh machine's compile when the store answers at once (loopback).

    python benchmarks/diag/prefetch_ab.py --model resnet50 --mode infer --device cuda --repeats 5 --out $OUT/ab.json

One castore-cold process fills a SeaweedFS bucket; then castore-hot processes alternate with the prefetch on
(``CASTORE_PREFETCH=1``, as castore runs by default) and off, each on a fresh machine. Prints each process's phases
and Dynamo's trace time, then the medians and the paired off/on ratio of the time to first output. Diagnostic only.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile

from _demo import demo_argv, parse_model_args, run_demo

from castore.bench.machines import castore_machine_env
from castore.testing.seaweedfs import SeaweedFS


def main() -> None:
    args = parse_model_args("cnn", "infer", repeats=(int, 3), out=(str, ""))
    work = tempfile.mkdtemp(prefix="castore-prefetch-ab-")
    argv = demo_argv(args, "--castore", "--fast-exit")
    rows: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    with SeaweedFS() as sw:
        bucket = sw.create_bucket()
        url = f"s3://{bucket}?endpoint={sw.endpoint}"

        def env(name: str, prefetch: str) -> dict[str, str]:
            e = castore_machine_env(os.path.join(work, name), url, "ab", sw.env())
            e["CASTORE_PREFETCH"] = prefetch
            return e

        pop, _ = run_demo("castore-cold", argv, env("cold", "1"))
        if pop is None:
            return
        for r in range(args.repeats):
            for way in (["on", "off"] if r % 2 == 0 else ["off", "on"]):
                res, _ = run_demo(way, argv, env(f"{way}-{r}", "1" if way == "on" else "0"))
                if res is None:
                    continue
                steps = res.get("compile_steps", {})
                row = {"first": res["seconds_to_first_output"], "compile": res["seconds_compile"],
                       "trace": steps.get("bytecode_tracing", [0])[0], "cpu": res["cpu_seconds"]["self"],
                       "prefetched": res.get("castore", {}).get("prefetched", 0)}
                rows[way].append(row)
                print(way, r, json.dumps(row), flush=True)
    pairs = [off["first"] / on["first"] for on, off in zip(rows["on"], rows["off"])]
    summary = {way: {k: statistics.median(x[k] for x in rs) for k in ("first", "compile", "trace", "cpu")} for way, rs in rows.items() if rs}
    summary["off_over_on_first_output"] = round(statistics.median(pairs), 3) if pairs else None
    print(json.dumps(summary), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": f"{args.model}:{args.mode}", "device": args.device, "rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
