#!/usr/bin/env bash
# The fleet story on a GPU machine: prewarm a workload into a bundle, pull it into a fresh directory, then run the
# workload on a fresh "machine" (empty Inductor, Triton and temp dirs) under `. DIR/env.sh` alone: it must make no
# Triton compile, no autotuning call and no C++ compiler run, and compute the same outputs.
#   bash benchmarks/fleet_gpu_story.sh [OUTDIR] [demo_model args...]
# Default workload: GPT-2 training step on cuda. The store is a local directory (the bucket's role); the pulled
# directory is what an image bakes in. Writes OUTDIR/{prewarm,pull,offline}.{out,err} and OUTDIR/summary.json.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-${OUT:-/tmp/fleet-gpu}}"; shift || true
ARGS=("$@"); [ ${#ARGS[@]} -gt 0 ] || ARGS=(--model gpt2 --mode train --device cuda)
PY="${PYTHON:-python3}"
# castore from this tree, and what the caller put on the path (on the GPU machine, `source benchmarks/gpu_env.sh`
# first: the carried wheels); the offline machine gets the same path and nothing else of this environment.
SITE="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$SITE"
W="$(mktemp -d)"; mkdir -p "$OUT"
machine() { mkdir -p "$W/$1"/{inductor,triton,tmp,castore,xdg}; echo "TORCHINDUCTOR_CACHE_DIR=$W/$1/inductor TRITON_CACHE_DIR=$W/$1/triton TMPDIR=$W/$1/tmp CASTORE_CACHE_DIR=$W/$1/castore XDG_CONFIG_HOME=$W/$1/xdg"; }
cd "$W"
env $(machine builder) "$PY" -m castore --url "file://$W/bucket" prewarm --name story -- \
  "$PY" -m castore.bench.demo_model "${ARGS[@]}" --castore >"$OUT/prewarm.out" 2>"$OUT/prewarm.err"
"$PY" -m castore --url "file://$W/bucket" pull story --into "$W/image" --json >"$OUT/pull.out" 2>"$OUT/pull.err"
# The offline machine: nothing of the builder's environment but PATH and HOME, plus env.sh.
env -i PATH="$PATH" HOME="$W/node" PYTHONPATH="$SITE" $(machine node) \
  sh -c '. "$1/env.sh" && shift && exec "$@"' sh "$W/image" "$PY" -m castore.bench.demo_model "${ARGS[@]}" --castore \
  >"$OUT/offline.out" 2>"$OUT/offline.err"
"$PY" - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
def last(path):
    return json.loads([l for l in open(path) if l.startswith('{"model"')][-1])
cold, warm = last(f"{out}/prewarm.out"), last(f"{out}/offline.out")
pull = json.load(open(f"{out}/pull.out"))
keys = ("seconds_to_first_output", "compiler_runs", "triton_compiles", "autotune_calls_total", "output_digest")
summary = {"cold": {k: cold.get(k) for k in keys}, "offline": {k: warm.get(k) for k in keys},
           "pull": {k: pull[k] for k in ("bundle", "entries", "objects", "bytes", "ranged_reads", "fingerprint")}}
summary["same_outputs"] = cold["output_digest"] == warm["output_digest"]
summary["offline_compiled_nothing"] = not (warm.get("compiler_runs") or warm.get("triton_compiles") or warm.get("autotune_calls_total"))
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps(summary, indent=1))
sys.exit(0 if summary["same_outputs"] and summary["offline_compiled_nothing"] else 1)
PYEOF
