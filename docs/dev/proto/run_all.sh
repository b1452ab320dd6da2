#!/bin/bash
# Each run: fresh TMPDIR (=> fresh default_cache_dir()/precompiled_headers) unless reused.
PY=/work/main/.venv/bin/python
R=/tmp/cs; export CASTORE_STORE=$R/store
export TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE=1 TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE=1
run() { # name tmpdir mode
  mkdir -p $R/$2/tmp; TMPDIR=$R/$2/tmp TORCHINDUCTOR_CACHE_DIR=$R/$2/ind TRITON_CACHE_DIR=$R/$2/tri \
  $PY run_model.py $3 2>$R/$1.err | sed "s/^/$1 /"; }
run cold_A        A kv       # cold, fills local dir A and the store (kv only)
run warmlocal_A   A kv       # same dirs again
run remote_B      B kv       # fresh machine, kv store only
run coldso_C      C kv+so    # cold with .so interception -> uploads .so/.gch
run remoteso_D    D kv+so    # fresh machine, kv + .so
run remoteso_E    E kv+so    # another fresh machine
# v2: with the CppBuilder.build fallback (ISA probes) -- new store
export CASTORE_STORE=$R/store2
run coldso2_G      G kv+so
run remoteso2_H    H kv+so
run remoteso2_I    I kv+so
run warmlocal_I    I kv+so
