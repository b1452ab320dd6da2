"""Hot-load benchmark: how long a fresh process takes to its first compiled output, per cache strategy.

Every measurement is a separate ``python -m castore.bench.demo_model`` process with its own directories, run
under a timeout; a failure is recorded, never fatal (the command exits 1 when no process of a measured mode
succeeded). The modes are listed in :mod:`castore.bench.modes`. Repeats are interleaved (round r runs every
mode once, in an order rotated by one each round) so that background load on a shared machine, and whatever one
process leaves to the next, hits every mode alike. The benchmark starts SeaweedFS (``weed``) and ``redis-server``
itself on 127.0.0.1 and installs nothing. ::

    castore bench                                      # defaults for this machine (CPU or GPU)
    castore bench --models gpt2:infer,gpt2:train --repeats 5 --dedup
    castore bench --quick --models mlp:infer --out /tmp/b
    castore bench --models my_model.py:make_model:train      # your own model (castore.bench.models)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from castore.bench.machines import (
    RedisServer,
    castore_machine_env,
    clean_env,
    find_redis_server,
    last_json,
    machine_slug,
    plain_machine_env,
    probe_machine,
    run_process,
)
from castore.bench.modes import (
    BREAKER_MESSAGE,
    CPU_MODELS,
    DEDUP_VARIANTS,
    GPU_MODELS,
    MODE_DESCRIPTIONS,
    MODES,
    NOT_STARTED,
    POPULATE_MODES,
    QUICK_MODES,
    REDIS_FLAGS,
    Run,
    model_slug,
    modes_to_run,
    resolve_model_spec,
    run_of,
    split_model_spec,
    uses_store,
)
from castore.bench.report import merge_reports, read_report, summarize, write_raw, write_raw_run, write_report


DESCRIPTION = "Time from process start to the first compiled output, per cache strategy, each measurement a fresh process."
DEFAULT_RESULTS_ROOT = "castore-bench"  # relative to the current directory; --out overrides
MODES_HELP = "modes:\n" + "\n".join(f"  {name:<17} {text}" for name, text in MODE_DESCRIPTIONS.items())


# -- the order of the processes ---------------------------------------------------------------------------------
def rotated(modes: list[str], repeat: int) -> list[str]:
    """The order of the modes in one repeat, rotated by one each repeat: a process that runs right after another
    kind (one that wrote its caches, or left the GPU driver busy) is not always the same mode's."""
    if not modes:
        return modes
    k = repeat % len(modes)
    return modes[k:] + modes[:k]


# -- the benchmark -------------------------------------------------------------------------------------------
class HotLoadBench:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.python = opts.python or sys.executable
        self.runs: list[Run] = []
        self.started = time.time()
        self.run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.work = tempfile.mkdtemp(prefix="castore-bench-", dir=opts.work_dir)
        self.raw_dir = os.path.join(opts.out, "raw")
        self.sw: Any = None
        self.proxy: Any = None
        self.redis: RedisServer | None = None
        self.bucket = ""
        self.unavailable: dict[str, str] = {}  # mode -> why it could not run at all

    # logging to stderr: stdout ends with the markdown table
    def say(self, msg: str) -> None:
        print(f"[hot_load {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    # -- environments for each kind of process
    def plain_env(self, root: str) -> dict[str, str]:
        return plain_machine_env(root)

    def castore_env(self, root: str, namespace: str, via_proxy: bool = False, prefix: str = "") -> dict[str, str]:
        """A fresh machine on the benchmark's bucket; a prefix of its own is an empty store (cold-writer)."""
        endpoint = self.proxy.endpoint if via_proxy else self.sw.endpoint
        where = f"{self.bucket}/{prefix}" if prefix else self.bucket
        return castore_machine_env(root, f"s3://{where}?endpoint={endpoint}", namespace, self.sw.env())

    def redis_env(self, root: str) -> dict[str, str]:
        env = self.plain_env(root)
        for name in REDIS_FLAGS:
            env[name] = "1"
        assert self.redis is not None
        env["TORCHINDUCTOR_REDIS_HOST"] = "127.0.0.1"
        env["TORCHINDUCTOR_REDIS_PORT"] = str(self.redis.port)
        return env

    # -- one measured process
    def measure(self, model: str, mode: str, repeat: int, args: list[str], env: dict[str, str]) -> Run:
        run = Run(model=model, mode=mode, repeat=repeat, argv=list(args), call=self.run_id)
        if self.opts.deadline and time.time() - self.started > self.opts.deadline:
            run.error = f"{NOT_STARTED} {self.opts.deadline:.0f} s"
            self.say(f"{model} {mode} #{repeat}: {run.error}")
            self.runs.append(run)
            return run
        self.say(f"{model} {mode} #{repeat} ...")
        rc, out, err, wall, error = run_process(self.python, args, env, self.opts.timeout, cwd=self.work)
        run.returncode, run.wall_seconds, run.error = rc, round(wall, 3), error
        run.stderr_tail = err[-4000:] if err else ""
        run.breaker = BREAKER_MESSAGE in (err or "")
        run.result = last_json(out)
        if error is None and rc != 0:
            run.error = f"exit status {rc}"
        elif error is None and run.result is None:
            run.error = "no JSON result on stdout"
        run.ok = run.error is None
        if run.ok:
            self.say(f"  {run.result['seconds_to_first_output']:.2f} s to first output (compile {run.result['seconds_compile']:.2f} s)")
        else:
            self.say(f"  FAILED: {run.error}: {run.stderr_tail[-300:]!r}")
        self.runs.append(run)
        write_raw_run(self.raw_dir, run.to_dict())
        return run

    def failed(self, model: str, mode: str, repeat: int, why: str) -> None:
        self.say(f"{model} {mode} #{repeat}: skipped ({why})")
        self.runs.append(Run(model=model, mode=mode, repeat=repeat, error=why, call=self.run_id))

    # -- servers
    def start_servers(self, modes: list[str], need_s3: bool) -> None:
        if need_s3:
            from castore.testing.faultproxy import FaultProxy
            from castore.testing.seaweedfs import SeaweedFS

            try:
                self.sw = SeaweedFS(weed=self.opts.weed).start()
                self.bucket = self.sw.create_bucket(f"bench-{uuid.uuid4().hex[:12]}")
                self.say(f"SeaweedFS at {self.sw.endpoint}, bucket {self.bucket}")
                if "castore-hot+rtt" in modes:
                    self.proxy = FaultProxy(self.sw.endpoint, latency=self.opts.rtt_ms / 1000.0).start()
                    self.say(f"FaultProxy at {self.proxy.endpoint} (+{self.opts.rtt_ms:g} ms per request)")
            except Exception as exc:  # noqa: BLE001 - recorded, the other modes still run
                self.sw = None
                for m in modes:
                    if uses_store(m):
                        self.unavailable[m] = f"SeaweedFS unavailable: {exc}"
                self.unavailable["dedup"] = f"SeaweedFS unavailable: {exc}"
        if "redis-remote" in modes:
            binary = find_redis_server(self.opts.redis_server)
            probe = subprocess.run([self.python, "-c", "import redis"], capture_output=True, text=True)
            if binary is None:
                self.unavailable["redis-remote"] = "redis-server not found (PATH, --redis-server or $CASTORE_REDIS_SERVER)"
            elif probe.returncode != 0:
                self.unavailable["redis-remote"] = "python package 'redis' missing in the benchmark's interpreter"
            else:
                try:
                    self.redis = RedisServer(binary).start()
                    self.say(f"redis-server {binary} on 127.0.0.1:{self.redis.port}")
                except Exception as exc:  # noqa: BLE001
                    self.unavailable["redis-remote"] = str(exc)

    def stop_servers(self) -> None:
        for name in ("proxy", "sw"):
            obj = getattr(self, name)
            if obj is not None:
                try:
                    obj.stop()
                except Exception:  # noqa: BLE001
                    pass
                setattr(self, name, None)
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    # -- one model
    def bench_model(self, spec: str, modes: list[str]) -> None:
        from castore.bench.models import is_factory

        model, phase = split_model_spec(spec)
        # --fast-exit: the measurement ends at the first output; the GPU machine spent 10 s more per process in
        # teardown (CUDA, compile workers), device time better spent on repeats.
        args = ["--model", model, "--mode", phase, "--device", self.opts.device, "--fast-exit"]
        if is_factory(model):  # your own model: a MODULE:FUNCTION is imported from where the benchmark was started
            args += ["--sys-path", os.getcwd()]
        if self.opts.layers:
            args += ["--layers", str(self.opts.layers)]
        if self.opts.batch:
            args += ["--batch", str(self.opts.batch)]
        label = f"{model}:{phase}"
        root = os.path.join(self.work, model_slug(label))
        namespace = f"bench-{self.run_id}-{model_slug(model)}-{phase}"
        # castore-aot reads a namespace of its own, filled by castore-aot-cold: castore-cold fills the others' only
        castore_modes = [m for m in modes if m.startswith("castore") and m != "castore-aot"]
        populated_dir = None
        if castore_modes and not any(m in self.unavailable for m in castore_modes):
            pop_root = os.path.join(root, "castore-cold")
            pop = self.measure(label, POPULATE_MODES["castore"], 0, args + ["--castore"], self.castore_env(pop_root, namespace))
            populated_dir = os.path.join(pop_root, "castore-local") if pop.ok else None
        if "redis-remote" in modes and "redis-remote" not in self.unavailable:
            self.measure(label, POPULATE_MODES["redis"], 0, args, self.redis_env(os.path.join(root, "redis-cold")))
        aot_namespace = namespace + "-aot"  # its own: the castore-hot runs' fetch plans stay as they were
        if "castore-aot" in modes and "castore-aot" not in self.unavailable:
            pop_aot = os.path.join(root, POPULATE_MODES["castore-aot"])
            self.measure(label, POPULATE_MODES["castore-aot"], 0, args + ["--aot"], self.castore_env(pop_aot, aot_namespace))
        local_layer = None  # castore's local layer as a castore-hot run left it: the castore-warm starting point
        for r in range(self.opts.repeats):
            if r < self.opts.cold_repeats:
                cold_root = os.path.join(root, f"cold-{r}")
                bundle = os.path.join(cold_root, "megacache.bin")
                cold = self.measure(label, "cold", r, args + (["--save-megacache", bundle] if "megacache" in modes else []), self.plain_env(cold_root))
            # else: warm-local and megacache start again from the last cold run's caches (--cold-repeats)
            for mode in rotated([m for m in modes if m != "cold"], r):
                if mode in self.unavailable:
                    self.failed(label, mode, r, self.unavailable[mode])
                    continue
                mroot = os.path.join(root, f"{mode}-{r}")
                if mode == "warm-local":
                    if cold.ok:
                        self.measure(label, mode, r, args, self.plain_env(cold_root))
                    else:
                        self.failed(label, mode, r, "its cold run failed")
                elif mode == "cold-writer":
                    empty = f"writer-{model_slug(label)}-{r}"
                    self.measure(label, mode, r, args + ["--castore"], self.castore_env(mroot, namespace, prefix=empty))
                elif mode == "castore-hot":
                    run = self.measure(label, mode, r, args + ["--castore"], self.castore_env(mroot, namespace))
                    if run.ok and local_layer is None:
                        local_layer = os.path.join(mroot, "castore-local")
                elif mode == "castore-warm":
                    source = local_layer or populated_dir
                    if source is None:
                        self.failed(label, mode, r, "no filled castore local layer")
                        continue
                    env = self.castore_env(mroot, namespace)
                    shutil.rmtree(env["CASTORE_CACHE_DIR"], ignore_errors=True)
                    shutil.copytree(source, env["CASTORE_CACHE_DIR"])
                    self.measure(label, mode, r, args + ["--castore"], env)
                elif mode == "castore-aot":
                    self.measure(label, mode, r, args + ["--aot"], self.castore_env(mroot, aot_namespace))
                elif mode == "castore-hot+rtt":
                    self.measure(label, mode, r, args + ["--castore"], self.castore_env(mroot, namespace, via_proxy=True))
                elif mode == "redis-remote":
                    self.measure(label, mode, r, args, self.redis_env(mroot))
                elif mode == "megacache":
                    bundles = [bundle] + [os.path.join(root, f"cold-{i}", "megacache.bin") for i in range(r)]
                    found = next((b for b in bundles if os.path.exists(b) and os.path.getsize(b) > 0), None)
                    if found is None:
                        self.failed(label, mode, r, "no MegaCache bundle (cold run failed or saved nothing)")
                        continue
                    self.measure(label, mode, r, args + ["--load-megacache", found], self.plain_env(mroot))
        if not self.opts.keep_work:
            shutil.rmtree(root, ignore_errors=True)

    # -- dedup
    def dedup(self, device_kind: str) -> dict[str, Any]:
        if self.sw is None:
            return {"error": self.unavailable.get("dedup", "SeaweedFS not started")}
        model, variants = DEDUP_VARIANTS[device_kind]
        namespace = f"dedup-{self.run_id}"
        steps = []
        for layers, batch in variants:
            root = os.path.join(self.work, f"dedup-{layers}-{batch}")
            args = ["--model", model, "--mode", self.opts.dedup_phase, "--device", self.opts.device, "--layers", str(layers), "--batch", str(batch)]
            run = self.measure(f"{model}:{self.opts.dedup_phase}", f"dedup-L{layers}-B{batch}", 0, args + ["--castore"], self.castore_env(root, namespace))
            usage = self.du(namespace)
            steps.append({"layers": layers, "batch": batch, "ok": run.ok, "du_after": usage})
            if not self.opts.keep_work:
                shutil.rmtree(root, ignore_errors=True)
        final = steps[-1]["du_after"] if steps else {}
        prev = 0
        for step in steps:
            logical = (step["du_after"] or {}).get("logical_bytes", prev)
            step["logical_bytes_added"] = logical - prev
            prev = logical
        out: dict[str, Any] = {"model": model, "namespace": namespace, "variants": steps, "du": final}
        if final and final.get("stored_bytes"):
            out["logical_bytes"] = final["logical_bytes"]
            out["stored_bytes"] = final["stored_bytes"]
            out["logical_over_stored"] = round(final["logical_bytes"] / final["stored_bytes"], 3)
        return out

    def du(self, namespace: str) -> dict[str, Any] | None:
        env = clean_env()
        env.update({k: v for k, v in self.sw.env().items() if k != "AWS_ENDPOINT_URL_S3"})
        env["CASTORE_CACHE_DIR"] = os.path.join(self.work, "du-local")
        url = f"s3://{self.bucket}?endpoint={self.sw.endpoint}"
        proc = subprocess.run([self.python, "-m", "castore", "--url", url, "du", namespace, "--json"], env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            self.say(f"castore du failed: {proc.stderr[-500:]}")
            return None
        return json.loads(proc.stdout)



# -- entry point ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None, results_root: str = DEFAULT_RESULTS_ROOT) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="castore bench", description=DESCRIPTION, epilog=MODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--models",
        help="comma-separated model:phase (phase infer|train), a model being a built-in one or your own, named "
        "FILE.py:FUNCTION or MODULE:FUNCTION (FUNCTION() returns (module, example inputs)); default per device: "
        + ",".join(CPU_MODELS) + " | " + ",".join(GPU_MODELS),
    )
    p.add_argument("--modes", help="comma-separated subset of " + ",".join(MODES) + " (cold always runs, and warm-local with any mode but cold-writer)")
    p.add_argument("--repeats", type=int, default=3, help="processes per mode and model (default 3)")
    p.add_argument("--cold-repeats", type=int, help="cold processes per model (default: --repeats); the rest of the repeats reuse the last cold run's caches")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--quick", action="store_true", help="one model (inference), 1 repeat, modes " + ",".join(QUICK_MODES))
    p.add_argument("--layers", type=int, help="layers of every built-in model (default: each model's own; tests use 1)")
    p.add_argument("--batch", type=int, help="batch size of every built-in model's example input (default: each model's own)")
    p.add_argument("--dedup", action="store_true", help="also measure dedup: castore du over four variants of one model")
    p.add_argument("--dedup-phase", default="infer", choices=["infer", "train"])
    p.add_argument(
        "--out", metavar="DIR",
        help=f"results directory (default: {results_root}/<machine slug>, e.g. {results_root}/cpu-2core-x86_64); "
        "hot_load.json, hot_load.md, hot_load.png and raw/ are written there",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per process (default 900)")
    p.add_argument("--rtt-ms", type=float, default=30.0, help="latency added to every S3 request in castore-hot+rtt (default 30)")
    p.add_argument("--redis-server", help="redis-server binary (default: $CASTORE_REDIS_SERVER, then PATH)")
    p.add_argument("--weed", help="SeaweedFS weed binary (default: $CASTORE_WEED, next to python, then PATH)")
    p.add_argument("--python", help="interpreter of the measured processes (default: this one)")
    p.add_argument("--work-dir", help="where the per-process machine dirs go (default: system temp)")
    p.add_argument("--keep-work", action="store_true", help="keep the per-process dirs")
    p.add_argument("--append", action="store_true", help="keep the runs of other models already in OUT/hot_load.json (split a long run into several commands)")
    p.add_argument("--rebuild", metavar="DIR", help="only recompute summary, markdown and chart from DIR/hot_load.json")
    p.add_argument(
        "--merge", metavar="DIR", nargs="+",
        help="pool the runs of several result dirs of one machine into --out (more processes per mode than one "
        "device call has time for); each run keeps the run_id of its call, processes never started are dropped",
    )
    p.add_argument("--deadline", type=float, help="start no process after this many seconds (the report is still written)")
    p.add_argument("--note", help="free text stored in the JSON and shown under the table (default: none)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, results_root: str = DEFAULT_RESULTS_ROOT) -> int:
    """Run the benchmark (or --rebuild / --merge a report); the exit status is 1 when no measured process succeeded.
    results_root: where --out defaults to (<results_root>/<machine slug>)."""
    opts = parse_args(argv, results_root)
    if opts.rebuild:
        with open(os.path.join(opts.rebuild, "hot_load.json")) as f:
            report = json.load(f)
        runs = [run_of(r) for r in report["runs"]]
        report["summary"] = summarize(runs, report["models"], report["modes"])
        if opts.note is not None:
            report["note"] = opts.note
        return finish(report, opts.rebuild, say=_say)
    if opts.merge:
        if not opts.out:
            raise SystemExit("--merge needs --out")
        report = merge_reports([read_report(d) for d in opts.merge])
        if opts.note is not None:
            report["note"] = opts.note
        os.makedirs(opts.out, exist_ok=True)
        write_raw(report["runs"], os.path.join(opts.out, "raw"))
        return finish(report, opts.out, say=_say)
    python = opts.python or sys.executable
    info = probe_machine(python)
    if opts.device == "auto":
        opts.device = "cuda" if info.get("cuda") else "cpu"
    device_kind = "cuda" if opts.device.startswith("cuda") else "cpu"
    slug = machine_slug(info, opts.device)
    models = [m.strip() for m in opts.models.split(",")] if opts.models else list(GPU_MODELS if device_kind == "cuda" else CPU_MODELS)
    models = [resolve_model_spec(m) for m in models if m and m != "none"]  # none: --dedup (and --append) only
    if opts.quick:
        if not opts.models:
            models = [split_model_spec(models[0])[0] + ":infer"]
        models = models[:1]
        opts.repeats = 1
    opts.cold_repeats = max(1, min(opts.cold_repeats or opts.repeats, opts.repeats))
    modes = [m.strip() for m in opts.modes.split(",")] if opts.modes else list(QUICK_MODES if opts.quick else MODES)
    try:
        modes = modes_to_run(modes)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    opts.out = os.path.abspath(opts.out or os.path.join(results_root, slug))
    os.makedirs(opts.out, exist_ok=True)
    raw_dir = os.path.join(opts.out, "raw")
    previous: dict[str, Any] | None = None
    if opts.append and os.path.exists(os.path.join(opts.out, "hot_load.json")):
        with open(os.path.join(opts.out, "hot_load.json")) as f:
            previous = json.load(f)
    elif os.path.isdir(raw_dir):
        shutil.rmtree(raw_dir)
    bench = HotLoadBench(opts)
    started = bench.started
    need_s3 = any(uses_store(m) for m in modes) or opts.dedup
    bench.say(f"machine {slug}, device {opts.device}, models {models}, modes {modes}, {opts.repeats} repeats")
    bench.say(f"results go to {opts.out}")
    dedup_result = None
    try:
        bench.start_servers(modes, need_s3)
        for model in models:
            bench.bench_model(model, modes)
        if opts.dedup:
            dedup_result = bench.dedup(device_kind)
    finally:
        bench.stop_servers()
        if not opts.keep_work:
            shutil.rmtree(bench.work, ignore_errors=True)
    if previous is not None:  # runs of the other models, from earlier commands
        kept = [r for r in previous.get("runs", []) if r["model"] not in models]
        bench.runs[:0] = [run_of(r) for r in kept]
        models = [m for m in previous.get("models", []) if m not in models] + models
        modes = [m for m in MODES if m in set(modes) | set(previous.get("modes", []))]
        if dedup_result is None:
            dedup_result = previous.get("dedup")
    note = opts.note or ""
    report: dict[str, Any] = {
        "benchmark": "hot_load",
        "run_id": bench.run_id,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "machine_slug": slug,
        "machine": info,
        "device": opts.device,
        "models": models,
        "modes": modes,
        "repeats": opts.repeats,
        "cold_repeats": opts.cold_repeats,
        "layers": opts.layers,
        "batch": opts.batch,
        "rtt_ms": opts.rtt_ms,
        "timeout_s": opts.timeout,
        "unavailable": bench.unavailable,
        "note": note,
        "summary": summarize(bench.runs, models, modes),
        "dedup": dedup_result,
        "runs": [r.to_dict() | {"stderr_tail": r.stderr_tail[-1500:]} for r in bench.runs],
    }
    return finish(report, opts.out, bench.say)


def finish(report: dict[str, Any], out: str, say: Callable[[str], None]) -> int:
    """Write the report, print its table on stdout, and say what failed; 1 when every measured row failed."""
    print(write_report(report, out, say), flush=True)
    rows = [r for r in report["summary"] if not r["populating_run"]]
    failed = [r for r in rows if r["ok"] == 0]
    if rows and len(failed) == len(rows):
        say(f"every measured mode failed ({len(rows)} rows); the errors are in the table and in hot_load.json")
        return 1
    if not rows and report.get("dedup") and report["dedup"].get("error"):
        say(f"dedup failed: {report['dedup']['error']}")
        return 1
    if failed:
        say(f"{len(failed)} of {len(rows)} rows had no successful process: " + ", ".join(f"{r['model']} {r['mode']}" for r in failed))
    return 0


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
