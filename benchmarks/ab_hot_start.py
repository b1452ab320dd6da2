"""Two castore variants side by side: castore-hot (a fresh machine served from a populated bucket), A against B.

A variant is a castore source tree (the working tree, or a checkout of another commit) plus environment
variables (signing keys, say). Each variant populates its own bucket on one SeaweedFS with a cold compile, then
every round runs one fresh-machine process of each variant, in an order that alternates round by round, so that
background load hits both alike. Reported: the median seconds to the first compiled output of each, B / A, the
paired ratios round by round, C++ compiler runs and whether the outputs match the writers'. ::

    git worktree add /tmp/base <commit>
    python benchmarks/ab_hot_start.py --a base=/tmp/base --b new=. --model transformer:infer --rounds 5 --out DIR
    python benchmarks/ab_hot_start.py --a unsigned=. --b signed=. --b-env CASTORE_SIGNING_KEY=... --out DIR

Uses the interpreter it runs under for both (its site-packages must have what both trees import).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

CACHE_VARS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TMPDIR", "TORCH_COMPILE_JOB_ID", "PYTHONPATH")


@dataclass
class Variant:
    name: str
    src: str
    env: dict[str, str] = field(default_factory=dict)
    bucket: str = ""
    writer_digest: str | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def module(self) -> str:
        """The measured process's module in this tree (it moved between versions)."""
        for module in ("castore.bench.demo_model", "castore.torch.demo_model"):
            if os.path.isfile(os.path.join(self.src, *module.split(".")) + ".py"):
                return module
        raise SystemExit(f"{self.src}: no castore demo_model module")


def parse_variant(text: str, env: list[str]) -> Variant:
    name, sep, src = text.partition("=")
    if not sep or not name or not src:
        raise SystemExit(f"expected NAME=SRC, got {text!r}")
    pairs = dict(item.split("=", 1) for item in env)
    return Variant(name, os.path.abspath(src), pairs)


def machine_env(variant: Variant, root: str, url: str, namespace: str, aws: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CASTORE_", "AWS_")) and k not in CACHE_VARS}
    env.update(aws)
    env.pop("AWS_ENDPOINT_URL_S3", None)
    for name, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton"), ("TMPDIR", "tmp"), ("CASTORE_CACHE_DIR", "local")):
        path = os.path.join(root, sub)
        os.makedirs(path, exist_ok=True)
        env[name] = path
    env.update({"CASTORE_URL": url, "CASTORE_NAMESPACE": namespace, "PYTHONPATH": variant.src})
    env.update(variant.env)
    return env


def run_one(variant: Variant, model: str, phase: str, env: dict[str, str], timeout: float) -> dict[str, Any]:
    args = [sys.executable, "-m", variant.module, "--model", model, "--mode", phase, "--castore", "--fast-exit"]
    started = time.time()
    proc = subprocess.run(args, env=env, cwd=env["TMPDIR"], capture_output=True, text=True, timeout=timeout)
    wall = time.time() - started
    result = None
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            break
    if proc.returncode != 0 or result is None:
        raise SystemExit(f"{variant.name}: process failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result["wall_seconds"] = round(wall, 3)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, metavar="NAME=SRC")
    parser.add_argument("--b", required=True, metavar="NAME=SRC")
    parser.add_argument("--a-env", action="append", default=[], metavar="K=V")
    parser.add_argument("--b-env", action="append", default=[], metavar="K=V")
    parser.add_argument("--model", default="transformer:infer", help="MODEL:PHASE (demo_model's built-in models)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", required=True)
    opts = parser.parse_args(argv)
    model, _, phase = opts.model.partition(":")
    phase = phase or "infer"
    variants = [parse_variant(opts.a, opts.a_env), parse_variant(opts.b, opts.b_env)]
    from castore.testing.seaweedfs import SeaweedFS

    work = tempfile.mkdtemp(prefix="castore-ab-")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        with SeaweedFS() as sw:
            aws = sw.env()
            for v in variants:
                v.bucket = sw.create_bucket(f"ab-{v.name.lower()}-{os.getpid()}")
                url = f"s3://{v.bucket}?endpoint={sw.endpoint}"
                env = machine_env(v, os.path.join(work, f"{v.name}-writer"), url, "ab", aws)
                writer = run_one(v, model, phase, env, opts.timeout)
                v.writer_digest = writer["output_digest"]
                print(f"[ab] {v.name}: writer {writer['seconds_to_first_output']:.2f} s", file=sys.stderr, flush=True)
            for r in range(opts.rounds):
                order = variants if r % 2 == 0 else variants[::-1]
                for v in order:
                    url = f"s3://{v.bucket}?endpoint={sw.endpoint}"
                    env = machine_env(v, os.path.join(work, f"{v.name}-hot-{r}"), url, "ab", aws)
                    result = run_one(v, model, phase, env, opts.timeout)
                    result["round"] = r
                    v.runs.append(result)
                    print(f"[ab] round {r} {v.name}: {result['seconds_to_first_output']:.2f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a, b = variants
    med = {v.name: statistics.median(x["seconds_to_first_output"] for x in v.runs) for v in variants}
    paired = [y["seconds_to_first_output"] / x["seconds_to_first_output"] for x, y in zip(a.runs, b.runs)]
    report = {
        "started": started,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "model": f"{model}:{phase}",
        "rounds": opts.rounds,
        "variants": [
            {
                "name": v.name,
                "src": v.src,
                "env": sorted(v.env),  # names only: values may be key paths
                "median_seconds": round(med[v.name], 3),
                "seconds": [x["seconds_to_first_output"] for x in v.runs],
                "compiler_runs": [x.get("compiler_runs") for x in v.runs],
                "outputs_match_writer": all(x["output_digest"] == v.writer_digest for x in v.runs),
            }
            for v in variants
        ],
        "ratio_b_over_a": round(med[b.name] / med[a.name], 4),
        "paired_ratio_median": round(statistics.median(paired), 4),
        "paired_ratios": [round(p, 4) for p in paired],
    }
    os.makedirs(opts.out, exist_ok=True)
    stem = os.path.join(opts.out, f"ab_{a.name}_vs_{b.name}_{model}_{phase}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for i, v in enumerate(variants):
            xs = [x["seconds_to_first_output"] for x in v.runs]
            ax.scatter([i] * len(xs), xs, alpha=0.6)
            ax.hlines(med[v.name], i - 0.2, i + 0.2, colors="black")
        ax.set_xticks([0, 1], [a.name, b.name])
        ax.set_ylabel("seconds to first output (fresh machine)")
        ax.set_title(f"{model}:{phase}, {opts.rounds} rounds: {b.name}/{a.name} = {report['ratio_b_over_a']:.3f}")
        fig.tight_layout()
        fig.savefig(stem + ".png", dpi=110)
        print(f"wrote {stem}.json and {stem}.png")
    except ImportError:
        print(f"wrote {stem}.json (no chart: matplotlib is not installed)")
    print(json.dumps({k: report[k] for k in ("ratio_b_over_a", "paired_ratio_median")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
