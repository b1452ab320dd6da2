"""One cold process, then one fresh-machine process, through a real S3 server with 30 ms per request.

    python benchmarks/diag/fresh_machine_smoke.py --model resnet50 --mode infer --device cuda

A quick end-to-end check of the torch integration on a machine (the GPU one, say) before a long benchmark:
prints, for each process, its time to first output, Triton compiles, autotune calls, prefetched objects and
castore's per-cache hits and misses.
"""
from __future__ import annotations

import json
import os
import tempfile

from _demo import demo_argv, parse_model_args, run_demo

from castore.bench.machines import castore_machine_env
from castore.testing.faultproxy import FaultProxy
from castore.testing.seaweedfs import SeaweedFS


def main() -> None:
    args = parse_model_args("transformer", "train", rtt_ms=(float, 30.0))
    work = tempfile.mkdtemp(prefix="castore-smoke-")
    with SeaweedFS() as sw, FaultProxy(sw.endpoint, latency=args.rtt_ms / 1000) as proxy:
        bucket = sw.create_bucket()
        for name in ("cold", "fresh"):
            env = castore_machine_env(os.path.join(work, name), f"s3://{bucket}?endpoint={proxy.endpoint}", "smoke", sw.env())
            r, stderr = run_demo(name, demo_argv(args, "--castore"), env, timeout=300)
            if r is None:
                continue
            c = r.get("castore", {})
            caches = {k: (v["hits"], v["misses"], v["puts"]) for k, v in c.get("caches", {}).items()}
            print(json.dumps({"process": name, "first_output_s": r["seconds_to_first_output"], "compile_s": r["seconds_compile"],
                              "triton_compiles": r.get("triton_compiles"), "autotune_calls": r.get("autotune_calls_total"),
                              "prefetched": c.get("prefetched"), "autotune_fixes": r.get("autotune_fixes"),
                              "caches_hits_misses_puts": caches, "digest": r["output_digest"]}), flush=True)
            warnings = [line for line in stderr.splitlines() if "castore" in line.lower()]
            if warnings:
                print("  stderr:", warnings[:5])


if __name__ == "__main__":
    main()
