"""Where a warm start's wall time goes, thread by thread: warm-local, castore-hot, castore-hot+rtt (and
castore-aot, the stored ahead-of-time function) under py-spy.

    python benchmarks/diag/profile_hot.py --model gpt2 --mode infer --device cuda --repeats 3 --out $OUT/prof
    python benchmarks/diag/profile_hot.py --model vit --mode infer --device cuda --modes warm-local,castore-aot
    python benchmarks/diag/profile_hot.py --model llama --mode train --modes cold,cold-writer   # the writer's tax

One cold process fills PyTorch's local caches, one castore-cold process a SeaweedFS bucket (one castore-aot-cold
too for castore-aot); then the chosen modes alternate (order rotated each repeat). With cold and cold-writer, each
process starts from an empty machine and the writer from an empty prefix. Each measured process is sampled by
``py-spy record --threads --idle --subprocesses`` ($CASTORE_PY_SPY, else py-spy on PATH). Writes each process's
raw samples under --out and prints, per mode: the phases demo_model reports, the seconds each thread of the
measured process was sampled, the seconds sampled in its subprocesses by kind (idle included, as for threads),
the functions of the main thread whose inclusive time differs most between each mode and warm-local (or cold),
and each mode's longest ones. A diagnostic: its printed report is evidence to read, not a benchmark result.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import statistics
import tempfile

from _demo import demo_argv, parse_model_args, print_phases, run_demo

from castore.bench.hot_load import rotated
from castore.bench.machines import castore_machine_env, plain_machine_env
from castore.testing.faultproxy import FaultProxy
from castore.testing.seaweedfs import SeaweedFS

MODES = ["warm-local", "castore-hot", "castore-hot+rtt", "castore-aot", "cold", "cold-writer"]
_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")  # "function (file:line)" -> function, file


def py_spy() -> str:
    found = os.environ.get("CASTORE_PY_SPY") or shutil.which("py-spy")
    if not found:
        raise SystemExit("py-spy not found: pip install py-spy, or set CASTORE_PY_SPY")
    return found


_PROCESS = re.compile(r'^process (\d+):"(.*)"$')
_THREAD = re.compile(r"^thread \((\d+)\)(?::\s*(.*))?$")


def parse_raw(path: str, rate: int) -> dict[str, object]:
    """Seconds per thread of the demo process, seconds sampled per kind of subprocess, main-thread inclusive seconds
    per function (each function counted once per sample). The demo process is the one running demo_model.py
    (py-spy does not always read a command line); a thread sampled without its name is named by its id."""
    samples: list[tuple[str, str, str, list[str], float]] = []  # pid, command, thread, frames, seconds
    for line in open(path):
        m = _LINE.match(line.rstrip("\n"))
        if not m or not line.startswith("process "):
            continue  # a multi-line command (an ISA probe's python -c) spills onto lines of its own
        stack = m.group(1).split(";")
        depth = 0  # a subprocess's samples start with its ancestors' "process" frames: the last one is its own
        while depth < len(stack) and _PROCESS.match(stack[depth]):
            depth += 1
        pm = _PROCESS.match(stack[depth - 1]) if depth else None
        tm = _THREAD.match(stack[depth]) if pm and depth < len(stack) else None
        if not pm or not tm:
            continue
        name = tm.group(2) or ("MainThread" if tm.group(1) == pm.group(1) else "unnamed")
        name = re.sub(r"[-_ ]?\d+$", "", name.strip()) or "unnamed"
        samples.append((pm.group(1), pm.group(2), name, stack[depth + 1 :], int(m.group(2)) / rate))
    in_demo = collections.Counter(pid for pid, _, _, frames, s in samples if any("demo_model.py" in f for f in frames))
    demo_pid = in_demo.most_common(1)[0][0] if in_demo else None
    threads: collections.Counter[str] = collections.Counter()
    children: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for pid, command, name, frames, seconds in samples:
        if pid != demo_pid:
            children["compile_worker" if "compile_worker" in command else command.split(" ")[0][-40:] or "unknown"] += seconds
            continue
        threads[name] += seconds
        if name == "MainThread":
            seen = set()
            for frame in frames:
                fm = _FRAME.match(frame)
                key = f"{fm.group(1)} ({os.path.basename(fm.group(2))})" if fm else frame
                if key not in seen:
                    seen.add(key)
                    inclusive[key] += seconds
    return {"threads": threads, "children": children, "inclusive": inclusive}


def main() -> None:
    args = parse_model_args("cnn", "infer", repeats=(int, 2), rate=(int, 100), out=(str, None),
                            modes=(str, "warm-local,castore-hot,castore-hot+rtt"))
    modes = args.modes.split(",")
    base = "cold" if "cold-writer" in modes else "warm-local"  # what each mode is compared with
    if base not in modes or not set(modes) <= set(MODES):
        raise SystemExit(f"--modes: warm-local (or cold, with cold-writer) and any of {', '.join(MODES)}")
    out = args.out or tempfile.mkdtemp(prefix="castore-prof-")
    os.makedirs(out, exist_ok=True)
    spy = py_spy()
    work = tempfile.mkdtemp(prefix="castore-prof-work-")
    demo = demo_argv(args, "--fast-exit")
    results: dict[str, list[dict]] = collections.defaultdict(list)
    profiles: dict[str, list[dict]] = collections.defaultdict(list)

    def run(name: str, argv: list[str], env: dict[str, str], profile: str | None = None) -> None:
        if profile:
            argv = [spy, "record", "--threads", "--idle", "--subprocesses", "--nonblocking", "--format", "raw",
                    "--rate", str(args.rate), "-o", profile, "--", *argv]  # fmt: skip
        r, _ = run_demo(name, argv, env)
        if r is None:
            return
        results[name].append(r)
        if profile:
            profiles[name].append(parse_raw(profile, args.rate))
        print_phases(name, r)

    with SeaweedFS() as sw, FaultProxy(sw.endpoint, latency=0.030) as proxy:
        bucket = sw.create_bucket()

        def castore_env(root: str, endpoint: str) -> dict[str, str]:
            return castore_machine_env(root, f"s3://{bucket}?endpoint={endpoint}", "prof", sw.env())

        cold_env = plain_machine_env(os.path.join(work, "cold"))
        if base == "warm-local":
            run("cold", demo, cold_env)
            run("castore-cold", [*demo, "--castore"], castore_env(os.path.join(work, "castore-cold"), sw.endpoint))
        if "castore-aot" in modes:
            run("castore-aot-cold", [*demo, "--aot"], castore_env(os.path.join(work, "castore-aot-cold"), sw.endpoint))
        for i in range(args.repeats):
            for mode in rotated(modes, i):
                profile = os.path.join(out, f"{mode}-{i}.txt")
                if mode == "warm-local":
                    run(mode, demo, cold_env, profile)
                elif mode == "cold":  # an empty machine each time
                    run(mode, demo, plain_machine_env(os.path.join(work, f"{mode}-{i}")), profile)
                elif mode == "cold-writer":  # castore writing into an empty prefix
                    env = castore_machine_env(os.path.join(work, f"{mode}-{i}"), f"s3://{bucket}?endpoint={sw.endpoint}",
                                              f"writer-{i}", sw.env())
                    run(mode, [*demo, "--castore"], env, profile)
                elif mode == "castore-aot":
                    run(mode, [*demo, "--aot"], castore_env(os.path.join(work, f"{mode}-{i}"), sw.endpoint), profile)
                else:
                    endpoint = proxy.endpoint if mode.endswith("rtt") else sw.endpoint
                    run(mode, [*demo, "--castore"], castore_env(os.path.join(work, f"{mode}-{i}"), endpoint), profile)
    shutil.rmtree(work, ignore_errors=True)
    report(modes, base, results, profiles)
    print("raw samples:", out)


def report(modes: list[str], base_mode: str, results: dict[str, list[dict]], profiles: dict[str, list[dict]]) -> None:
    def med(values: list[float]) -> float:
        return round(statistics.median(values), 3) if values else float("nan")

    def per_process(mode: str, part: str) -> dict[str, float]:
        keys = set().union(*(p[part] for p in profiles[mode])) if profiles[mode] else set()
        return {k: med([p[part].get(k, 0.0) for p in profiles[mode]]) for k in keys}

    for mode in modes:
        rs = results[mode]
        if not rs:
            continue
        phases = {
            "first_output": med([r["seconds_to_first_output"] for r in rs]),
            "import": med([r["seconds_import"] for r in rs]),
            "build": med([r["seconds_to_first_output"] - r["seconds_import"] - r["seconds_compile"] for r in rs]),
            "compile": med([r["seconds_compile"] for r in rs]),
        }
        print(json.dumps({"mode": mode, "processes": len(rs), "phases": phases,
                          "threads_s": per_process(mode, "threads"), "subprocess_s": per_process(mode, "children")}))  # fmt: skip
    base = per_process(base_mode, "inclusive")
    for mode in modes:
        if mode == base_mode or not profiles[mode]:
            continue
        mine = per_process(mode, "inclusive")
        diff = {k: mine.get(k, 0.0) - base.get(k, 0.0) for k in set(mine) | set(base)}
        ranked = sorted(diff, key=lambda k: -diff[k])
        print(f"main thread, inclusive seconds (medians per process): {mode} against {base_mode}, most above and below")
        for key in ranked[:25] + ranked[-25:]:
            print(f"  {mine.get(key, 0.0):7.2f} {base.get(key, 0.0):7.2f}  {key[:120]}")
    for mode in modes:
        if profiles[mode]:
            mine = per_process(mode, "inclusive")
            print(f"main thread, {mode}: the 40 longest functions, inclusive seconds (median per process)")
            for key in sorted(mine, key=lambda k: -mine[k])[:40]:
                print(f"  {mine[key]:7.2f}  {key[:120]}")


if __name__ == "__main__":
    main()
