#!/bin/bash
PY=/work/main/.venv/bin/python
R=/tmp/cs
export TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE=1 TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE=1
run() { mkdir -p $R/$2/tmp; TMPDIR=$R/$2/tmp TORCHINDUCTOR_CACHE_DIR=$R/$2/ind TRITON_CACHE_DIR=$R/$2/tri $PY run_model.py $3 2>$R/$1.err | sed "s/^/$1 /"; }
# v2: with the CppBuilder.build fallback (ISA probes) -- new store
export CASTORE_STORE=$R/store2
run coldso2_G      G kv+so
run remoteso2_H    H kv+so
run remoteso2_I    I kv+so
run warmlocal_I    I kv+so
