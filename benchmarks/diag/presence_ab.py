"""What castore's mere presence costs a warm start, apart from what a fresh machine must fetch and write.

    python benchmarks/diag/presence_ab.py --model resnet50 --mode infer --device cuda --repeats 5 --out $OUT/presence.json

One cold process fills PyTorch's local caches of a plain machine; one castore-cold process fills a SeaweedFS bucket
and its own machine's local caches. Then, rotated round by round:
- warm-local: the plain machine again (PyTorch's caches, castore off);
- castore-over-warm: the castore-cold machine again, castore on: every lookup hits PyTorch's local caches first, so
  what remains is castore's install, its patches, its threads and PyTorch's remote-cache switches;
- castore-hot: a fresh machine served from the bucket (the benchmark's mode);
- castore-hot-no-prefetch: the same with the fetch plan's prefetch off (CASTORE_PREFETCH=0).
Prints each process's phases and CPU seconds, then per mode the medians and the paired ratios over warm-local of
the time to first output and of the compile phase. A diagnostic: evidence to read, not a benchmark result.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile

from _demo import demo_argv, parse_model_args, print_phases, run_demo

from castore.bench.hot_load import rotated
from castore.bench.machines import castore_machine_env, plain_machine_env
from castore.testing.seaweedfs import SeaweedFS

MODES = ["warm-local", "castore-over-warm", "castore-hot", "castore-hot-no-prefetch"]


def main() -> None:
    args = parse_model_args("cnn", "infer", repeats=(int, 3), out=(str, ""))
    work = tempfile.mkdtemp(prefix="castore-presence-ab-")
    plain = demo_argv(args, "--fast-exit")
    with_castore = demo_argv(args, "--castore", "--fast-exit")
    rows: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with SeaweedFS() as sw:
        url = f"s3://{sw.create_bucket()}?endpoint={sw.endpoint}"

        def castore_env(name: str, **extra: str) -> dict[str, str]:
            env = castore_machine_env(os.path.join(work, name), url, "ab", sw.env())
            env.update(extra)
            return env

        plain_root = os.path.join(work, "plain")
        for name, argv, env in (("cold", plain, plain_machine_env(plain_root)), ("castore-cold", with_castore, castore_env("populated"))):
            result, _ = run_demo(name, argv, env)
            if result is None:
                return
            print_phases(name, result)
        for r in range(args.repeats):
            for mode in rotated(MODES, r):
                if mode == "warm-local":
                    argv, env = plain, plain_machine_env(plain_root)
                elif mode == "castore-over-warm":
                    argv, env = with_castore, castore_env("populated")
                elif mode == "castore-hot":
                    argv, env = with_castore, castore_env(f"hot-{r}")
                else:
                    argv, env = with_castore, castore_env(f"hot-no-prefetch-{r}", CASTORE_PREFETCH="0")
                result, _ = run_demo(mode, argv, env)
                if result is None:
                    continue
                print_phases(f"{mode} {r}", result)
                cpu = result.get("cpu_seconds") or {}
                rows[mode].append({
                    "repeat": r, "first": result["seconds_to_first_output"], "compile": result["seconds_compile"],
                    "import": result["seconds_import"], "cpu": cpu.get("self"), "cpu_main": cpu.get("main_thread"),
                    "cpu_workers": cpu.get("descendants"), "gc": (result.get("gc") or {}).get("seconds"),
                })
    summary: dict[str, dict[str, float | None]] = {}
    base = {row["repeat"]: row for row in rows["warm-local"]}
    for mode, mode_rows in rows.items():
        if not mode_rows:
            continue
        medians = {k: statistics.median(float(row[k]) for row in mode_rows if row[k] is not None) for k in ("first", "compile", "import", "cpu", "cpu_main", "cpu_workers", "gc") if any(row[k] is not None for row in mode_rows)}
        for part in ("first", "compile"):
            pairs = [row[part] / base[row["repeat"]][part] for row in mode_rows if row["repeat"] in base]
            medians[f"paired_{part}"] = round(statistics.median(pairs), 3) if pairs else None
        summary[mode] = medians
        print(mode, json.dumps(medians), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": f"{args.model}:{args.mode}", "device": args.device, "rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
