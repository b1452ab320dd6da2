"""castore in Inductor's compile workers: put autotune entries from inside a SubprocPool worker.

The parent installs castore (configured from CASTORE_* in the environment), starts Inductor's compile worker
pool (``python -m torch._inductor.compile_worker``, which forks its workers) and submits ``put_entries``. In
the worker, nothing but the environment castore exported (PYTHONPATH naming castore's sitecustomize folder,
CASTORE_TORCH_AUTOINSTALL=1) can install castore: the worker creates PyTorch's RemoteAutotuneCache exactly as
``torch._inductor.runtime.autotune_cache`` does, puts N autotune-shaped entries and flushes castore there.

Prints ``RESULT {json}`` with what the worker saw (its pid, whether castore was active, the backend class).
"""

from __future__ import annotations

import json
import os
import sys


def put_entries(cache_key: str, n: int) -> dict[str, object]:
    """Runs inside the compile worker."""
    import torch._inductor.remote_cache as rc

    cache = rc.create_cache(cache_key, False, "FbRemoteAutotuneCache", "RemoteAutotuneCache")
    import castore.torch

    session = castore.torch.active_session()
    out: dict[str, object] = {
        "pid": os.getpid(),
        "castore_active": session is not None,
        "cache": type(cache).__name__ if cache is not None else None,
        "backend": type(cache.backend).__name__ if cache is not None else None,
    }
    if cache is None:
        return out
    for i in range(n):
        # The shape of an autotune entry (runtime/autotune_cache.py: triton config + bookkeeping).
        value = {
            "XBLOCK": 64 << (i % 3),
            "num_warps": 4,
            "num_stages": 1,
            "configs_hash": f"{i:064x}",
            "found_by_coordesc": False,
            "time_taken_ms": 10 + i,
            "triton_cache_hash": None,
        }
        cache.put(f"autotune-{cache_key}-{i:04d}", value)
    out["flushed"] = session.flush(60) if session is not None else False
    out["stats"] = castore.torch.stats()
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    import castore.torch

    castore.torch.install()
    from torch._inductor.compile_worker.subproc_pool import SubprocPool

    from worker_autotune import put_entries as fn  # by module name, so the worker can unpickle it

    pool = SubprocPool(1)
    try:
        result = pool.submit(fn, "castore-worker-test", n).result(timeout=180)
    finally:
        pool.shutdown()
    result["parent_pid"] = os.getpid()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
