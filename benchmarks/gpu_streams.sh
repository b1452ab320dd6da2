#!/usr/bin/env bash
# Several hot-load benchmarks at once on a machine of one or more GPUs: stream i runs on GPU (i mod GPUs), each its
# own `castore bench` (its own SeaweedFS, its own modes alternated round by round), so ratios stay side by side
# within a stream. Results of stream i go to OUTDIR/s<i>/, then all of them into OUTDIR.tar.gz.
#   source benchmarks/gpu_env.sh
#   bash benchmarks/gpu_streams.sh OUTDIR DEADLINE_S "--models a:infer --modes ..." "--models b:train ..." ...
# DEADLINE_S: no stream starts a process after this many seconds (each still writes its report).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$1"; DEADLINE="$2"; shift 2
GPUS="$(nvidia-smi -L 2>/dev/null | wc -l)"; [ "$GPUS" -gt 0 ] || GPUS=1
mkdir -p "$OUT"
i=0
for spec in "$@"; do
  dir="$OUT/s$i"; mkdir -p "$dir"
  # shellcheck disable=SC2086 # each spec is a list of arguments
  CUDA_VISIBLE_DEVICES=$((i % GPUS)) python3 -m castore.bench.hot_load $spec --device cuda --deadline "$DEADLINE" \
    --out "$dir" >"$dir/stdout.md" 2>"$dir/stderr.log" &
  i=$((i + 1))
done
wait
nvidia-smi --query-gpu=name,driver_version --format=csv >"$OUT/gpus.csv" 2>/dev/null || true
tar -C "$OUT" -czf "$OUT.tar.gz" .
for d in "$OUT"/s*/; do tail -n 30 "$d/stdout.md" | grep '^|' ; grep -h "FAILED" "$d/stderr.log" | tail -n 3; done
