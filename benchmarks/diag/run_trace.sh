#!/bin/bash
# GPU diagnosis: PyTorch's own cold then warm-local runs with autotuning traced; torch's sources for reference.
# Usage (device machine): bash benchmarks/diag/run_trace.sh OUTDIR "gpt2 train" "gpt2-autotune infer"
set -u
out=$1; shift
source "$(dirname "$0")/../gpu_env.sh"
work=$(mktemp -d); mkdir -p "$work/res"
T=$(python3 -c "import torch,os;print(os.path.dirname(torch.__file__))")
mkdir -p "$work/res/src"
cp "$T"/_inductor/runtime/{triton_heuristics,autotune_cache,coordinate_descent_tuner}.py "$T"/_inductor/codecache.py "$work/res/src/"
for spec in "$@"; do
  set -- $spec; m=$1; mode=$2; d="$work/c_${m}_${mode}"
  for phase in cold warm; do
    echo "== $m $mode $phase $(date +%T)"
    TORCHINDUCTOR_CACHE_DIR=$d/ind TRITON_CACHE_DIR=$d/tri timeout 240 python3 "$(dirname "$0")/autotune_trace.py" \
      --trace-out "$work/res/trace_${m}_${mode}_${phase}.jsonl" -- --model "$m" --mode "$mode" --device cuda \
      > "$work/res/res_${m}_${mode}_${phase}.json" 2> "$work/res/err_${m}_${mode}_${phase}.log"
    echo "rc=$? $(cut -c1-400 "$work/res/res_${m}_${mode}_${phase}.json")"
  done
done
tar czf "$out/trace.tgz" -C "$work" res
