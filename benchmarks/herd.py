#!/usr/bin/env python
"""Thundering herd: many fresh processes start the same compiled model at once against one bucket.

One cold compile of the model fills a bucket on SeaweedFS; every later process talks to the bucket through a
counting proxy (castore.testing.faultproxy in pass-through mode) that tallies requests by method, object kind and
status. Phases, each on fresh node directories (Inductor, Triton, TMPDIR, castore's local layer):

    settle      one hot start right after the cold compile (it writes the fetch plan): not compared
    lone        one hot start: the reference for requests per process
    herd        --processes fresh processes on ONE node at once, sharing its dirs and its local layer
    sequential  the same number of hot starts on one fresh node, one after another
    nodes       --nodes simulated nodes at once, each with its own dirs and local layer

Reported per phase: the phase's wall time, each process's time to first output and C++ compiler runs (must be 0),
bucket requests (GET, HEAD, LIST, PUT; 503 and other errors), failed processes and circuit-breaker openings.
Writes herd.json and herd.png under --out. ::

    .venv/bin/python benchmarks/herd.py --out benchmarks/results/cpu-2core-x86_64/herd      # 16 processes, 8 nodes
    .venv/bin/python benchmarks/herd.py --processes 3 --nodes 2 --out /tmp/herd-smoke          # a smoke run

The full run wants a quiet machine: 16 processes compete for its cores, and the timings mean little otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from castore.bench.hot_load import BREAKER_MESSAGE, castore_machine_env, last_json, run_process  # noqa: E402
from castore.testing.faultproxy import FaultProxy  # noqa: E402


class CountingProxy(FaultProxy):
    """A pass-through FaultProxy that tallies every forwarded request by (method, object kind, status)."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream, max_connections=512)
        self.tally: Counter[tuple[str, str, int]] = Counter()
        self._tally_lock = threading.Lock()

    def _forward(self, method, target, headers, body):  # noqa: ANN001, ANN202
        response = super()._forward(method, target, headers, body)
        kind = "list" if "list-type=" in target else "manifest" if "/manifests/" in target else "chunk" if "/chunks/" in target else "other"
        with self._tally_lock:
            self.tally[(method, kind, response[0])] += 1
        return response

    def take(self) -> dict[str, Any]:
        """The requests since the last take(), summarised, and a fresh tally."""
        with self._tally_lock:
            tally, self.tally = self.tally, Counter()
        out: dict[str, Any] = {"total": sum(tally.values())}
        for method in ("GET", "HEAD", "PUT", "DELETE"):
            out[method] = sum(n for (m, k, _), n in tally.items() if m == method and k != "list")
        out["LIST"] = sum(n for (_, k, _), n in tally.items() if k == "list")
        out["GET_by_kind"] = {k: sum(n for (m, kk, _), n in tally.items() if m == "GET" and kk == k) for k in ("manifest", "chunk", "other")}
        out["status_503"] = sum(n for (_, _, s), n in tally.items() if s == 503)
        out["errors"] = sum(n for (m, _, s), n in tally.items() if s >= 500 or (s >= 400 and not (s == 404 and m in ("GET", "HEAD"))))
        out["not_found"] = sum(n for (_, _, s), n in tally.items() if s == 404)
        return out


def _process_summary(rc: int | None, out: str, err: str, wall: float, error: str | None) -> dict[str, Any]:
    result = last_json(out) or {}
    castore = result.get("castore") or {}
    caches = castore.get("caches") or {}
    ok = error is None and rc == 0 and bool(result)
    return {
        "ok": ok,
        "error": error or (None if ok else f"exit status {rc}" if rc else "no JSON result"),
        "wall_seconds": round(wall, 3),
        "seconds_to_first_output": result.get("seconds_to_first_output"),
        "compiler_runs": result.get("compiler_runs"),
        "fxgraph": result.get("fxgraph"),
        "output_digest": result.get("output_digest"),
        "store_errors": sum(c.get("get_errors", 0) + c.get("put_errors", 0) for c in caches.values()),
        "bucket_fetches": (castore.get("layers") or {}).get("bucket", {}).get("fetches"),
        "local_hits": (castore.get("layers") or {}).get("local", {}).get("hits"),
        "breaker": BREAKER_MESSAGE in (err or ""),
        "stderr_tail": "" if ok else (err or "")[-1500:],
    }


class Herd:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.python = opts.python or sys.executable
        self.work = tempfile.mkdtemp(prefix="castore-herd-", dir=opts.work_dir)
        self.namespace = f"herd-{uuid.uuid4().hex[:8]}"
        self.args = ["--model", opts.model, "--mode", opts.phase, "--device", opts.device, "--fast-exit", "--castore"]
        if opts.layers:
            self.args += ["--layers", str(opts.layers)]
        self.sw: Any = None
        self.proxy: CountingProxy | None = None
        self.bucket = ""

    def say(self, msg: str) -> None:
        print(f"[herd {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def env(self, node: str, *, direct: bool = False) -> dict[str, str]:
        assert self.proxy is not None
        endpoint = self.sw.endpoint if direct else self.proxy.endpoint
        return castore_machine_env(os.path.join(self.work, node), f"s3://{self.bucket}?endpoint={endpoint}", self.namespace, self.sw.env())

    def run_one(self, env: dict[str, str]) -> dict[str, Any]:
        return _process_summary(*run_process(self.python, self.args, env, self.opts.timeout, cwd=self.work))

    def run_together(self, envs: list[dict[str, str]]) -> tuple[float, list[dict[str, Any]]]:
        results: list[dict[str, Any] | None] = [None] * len(envs)

        def one(i: int) -> None:
            results[i] = self.run_one(envs[i])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(envs))]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.monotonic() - started, [r for r in results if r is not None]

    def phase(self, name: str, envs: list[dict[str, str]], *, together: bool) -> dict[str, Any]:
        assert self.proxy is not None
        self.say(f"{name}: {len(envs)} process(es) {'at once' if together else 'one after another'}")
        self.proxy.take()
        if together:
            wall, procs = self.run_together(envs)
        else:
            started = time.monotonic()
            procs = [self.run_one(env) for env in envs]
            wall = time.monotonic() - started
        requests = self.proxy.take()
        firsts = [p["seconds_to_first_output"] for p in procs if p["seconds_to_first_output"] is not None]
        out = {
            "processes": len(envs),
            "wall_seconds": round(wall, 3),
            "first_output_seconds": {"min": min(firsts), "median": sorted(firsts)[len(firsts) // 2], "max": max(firsts)} if firsts else None,
            "failed": sum(not p["ok"] for p in procs),
            "compiler_runs": sum(p["compiler_runs"] or 0 for p in procs),
            "store_errors": sum(p["store_errors"] for p in procs),
            "breaker_openings": sum(p["breaker"] for p in procs),
            "requests": requests,
            "per_process": procs,
        }
        self.say(f"  wall {wall:.1f} s, {requests['GET']} GET {requests['HEAD']} HEAD {requests['LIST']} LIST, "
                 f"{out['failed']} failed, {out['compiler_runs']} compiler runs, {requests['status_503']} x 503")
        return out

    def run(self) -> dict[str, Any]:
        from castore.testing.seaweedfs import SeaweedFS

        opts = self.opts
        report: dict[str, Any] = {
            "benchmark": "herd",
            "model": f"{opts.model}:{opts.phase}",
            "device": opts.device,
            "processes": opts.processes,
            "nodes": opts.nodes,
            "machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(), "python": platform.python_version()},
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with SeaweedFS(weed=opts.weed) as sw:
            self.sw = sw
            self.bucket = sw.create_bucket(f"herd-{uuid.uuid4().hex[:10]}")
            with CountingProxy(sw.endpoint) as proxy:
                self.proxy = proxy
                self.say(f"SeaweedFS {sw.endpoint}, counting proxy {proxy.endpoint}, bucket {self.bucket}")
                cold = self.run_one(self.env("cold", direct=True))
                report["cold"] = cold
                if not cold["ok"]:
                    self.say(f"cold compile failed: {cold['error']}: {cold['stderr_tail'][-500:]}")
                    report["error"] = "the populating cold compile failed"
                    return report
                self.say(f"cold compile: {cold['seconds_to_first_output']} s, {cold['compiler_runs']} compiler runs")
                # The first hot start after a cold compile also writes the job's fetch plan: a settling run, so that
                # every measured phase sees the bucket as a fleet does.
                report["settle"] = self.phase("settle", [self.env("settle")], together=True)
                phases: dict[str, Any] = {}
                phases["lone"] = self.phase("lone", [self.env("lone")], together=True)
                phases["herd"] = self.phase("herd", [self.env("herd-node")] * opts.processes, together=True)
                phases["sequential"] = self.phase("sequential", [self.env("seq-node")] * opts.processes, together=False)
                phases["nodes"] = self.phase("nodes", [self.env(f"node-{i}") for i in range(opts.nodes)], together=True)
                report["phases"] = phases
        report["checks"] = checks(report)
        if not opts.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        return report


def checks(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's acceptance figures, computed from the phases."""
    p = report["phases"]
    lone_gets = p["lone"]["requests"]["GET"] or 1
    digests = {q["output_digest"] for ph in p.values() for q in ph["per_process"] if q["output_digest"]}
    return {
        "herd_gets_over_lone_gets": round(p["herd"]["requests"]["GET"] / lone_gets, 3),
        "herd_gets_within_1_1x_of_lone": p["herd"]["requests"]["GET"] <= 1.1 * lone_gets,
        "herd_wall_over_sequential_wall": round(p["herd"]["wall_seconds"] / max(p["sequential"]["wall_seconds"], 1e-9), 3),
        "herd_no_slower_than_sequential": p["herd"]["wall_seconds"] <= p["sequential"]["wall_seconds"],
        "nodes_gets_over_lone_gets": round(p["nodes"]["requests"]["GET"] / lone_gets, 3),
        "compiler_runs": sum(ph["compiler_runs"] for ph in p.values()),
        "failed_processes": sum(ph["failed"] for ph in p.values()),
        "status_503": sum(ph["requests"]["status_503"] for ph in p.values()),
        "same_output_everywhere": len(digests) <= 1,
    }


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = report["phases"]
    names = list(phases)
    labels = [f"{n}\n({phases[n]['processes']} proc)" for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.bar(labels, [phases[n]["wall_seconds"] for n in names], color=["#888", "#c44", "#48c", "#4a4"][: len(names)])
    ax1.set_ylabel("wall seconds of the phase")
    ax1.set_title("wall time")
    gets = [phases[n]["requests"]["GET"] for n in names]
    heads = [phases[n]["requests"]["HEAD"] for n in names]
    ax2.bar(labels, gets, label="GET")
    ax2.bar(labels, heads, bottom=gets, label="HEAD")
    ax2.axhline(phases["lone"]["requests"]["GET"] * 1.1, color="k", ls="--", lw=1, label="1.1 x lone GETs")
    ax2.set_title("bucket requests")
    ax2.legend()
    fig.suptitle(f"thundering herd: {report['model']} on {report['device']}, {report['machine']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=16, help="processes of the one-node herd and of the sequential run (16)")
    p.add_argument("--nodes", type=int, default=8, help="simulated nodes started at once (8)")
    p.add_argument("--model", default="transformer", help="castore.bench.demo_model model (transformer)")
    p.add_argument("--phase", default="infer", choices=["infer", "train"])
    p.add_argument("--layers", type=int, help="model layers (default: the model's own)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per process")
    p.add_argument("--out", required=True, help="directory for herd.json and herd.png")
    p.add_argument("--weed", help="SeaweedFS weed binary")
    p.add_argument("--python", help="interpreter of the processes (default: this one)")
    p.add_argument("--work-dir", help="where node directories go (default: system temp)")
    p.add_argument("--keep-work", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    os.makedirs(opts.out, exist_ok=True)
    report = Herd(opts).run()
    with open(os.path.join(opts.out, "herd.json"), "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    if "phases" in report:
        plot(report, os.path.join(opts.out, "herd.png"))
        print(json.dumps(report["checks"], indent=2))
    return 0 if "phases" in report and report["checks"]["failed_processes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
