#!/usr/bin/env bash
# Several hot-load benchmarks at once on a machine of one or more GPUs: stream i runs on GPU (i mod GPUs), each its
# own `castore bench` (its own SeaweedFS, its own modes alternated round by round), so ratios stay side by side
# within a stream. Results of stream i go to OUTDIR/s<i>/, then all of them into OUTDIR.tar.gz.
#   source benchmarks/gpu_env.sh
#   bash benchmarks/gpu_streams.sh OUTDIR DEADLINE_S "--models a:infer --modes ..." "--models b:train ..." ...
# DEADLINE_S: no stream starts a process after this many seconds (each still writes its report).
# A spec may hold several benchmarks separated by " ;; ": they run one after another in that stream, into the
# same results (--append), e.g. other modes for another model.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$1"; DEADLINE="$2"; shift 2
GPUS="$(nvidia-smi -L 2>/dev/null | wc -l)"; [ "$GPUS" -gt 0 ] || GPUS=1
mkdir -p "$OUT"
START=$(date +%s)
run_stream() {  # $1: stream index, $2: its spec
  local dir="$OUT/s$1" first=1 part left
  mkdir -p "$dir"
  while IFS= read -r part; do
    [ -n "${part// /}" ] || continue
    left=$((DEADLINE - ($(date +%s) - START)))
    [ "$left" -gt 0 ] || break
    # shellcheck disable=SC2086 # each part is a list of arguments
    CUDA_VISIBLE_DEVICES=$(($1 % GPUS)) python3 -m castore.bench.hot_load $part --device cuda --deadline "$left" \
      --out "$dir" $([ "$first" = 1 ] || echo --append) >>"$dir/stdout.md" 2>>"$dir/stderr.log"
    first=0
  done < <(printf '%s\n' "$2" | sed 's/ ;; /\n/g')
}
i=0
for spec in "$@"; do
  run_stream "$i" "$spec" &
  i=$((i + 1))
done
wait
nvidia-smi --query-gpu=name,driver_version --format=csv >"$OUT/gpus.csv" 2>/dev/null || true
tar -C "$OUT" -czf "$OUT.tar.gz" .
for d in "$OUT"/s*/; do tail -n 30 "$d/stdout.md" | grep '^|' ; grep -h "FAILED" "$d/stderr.log" | tail -n 3; done
