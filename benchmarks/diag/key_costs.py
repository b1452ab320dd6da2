"""How long PyTorch's and Triton's source-hash keys take in a fresh process, and where they are defined and called.

    python benchmarks/diag/key_costs.py

Prints the versions, the definitions of torch_key and triton_key, every module that names triton_key, and the
seconds each key takes the first time (and a stat walk of the files they read) in this process.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import time


def main() -> None:
    import torch

    print("torch", torch.__version__)
    from torch._inductor import codecache

    for name in ("torch_key", "triton_key"):
        fn = getattr(codecache, name, None)
        if fn is None:
            print(f"--- codecache.{name}: absent")
            continue
        print(f"--- codecache.{name}: {type(fn).__name__}, set={hasattr(fn, 'set')}")
        print(inspect.getsource(getattr(fn, "__wrapped__", fn))[:1500])
    try:
        import triton
        from torch._inductor.runtime.triton_compat import triton_key
    except ImportError as exc:
        print("no triton:", exc)
        triton = None
    if triton is not None:
        print("triton", triton.__version__, triton_key.__module__, type(triton_key).__name__)
        print(inspect.getsource(getattr(triton_key, "__wrapped__", triton_key)))
        root = os.path.dirname(triton.__file__)
        print(subprocess.run(["grep", "-rn", "triton_key", root, "--include=*.py"], capture_output=True, text=True).stdout)
        for dirpath, _, files in os.walk(root):
            for f in files:
                if f.endswith(".so"):
                    p = os.path.join(dirpath, f)
                    print("so", p, os.path.getsize(p))
        t = time.perf_counter()
        n = sum(len(files) for _, _, files in os.walk(root))
        print(f"walk of triton: {n} files {time.perf_counter() - t:.3f} s")
        t = time.perf_counter()
        triton_key()
        print(f"triton_key {time.perf_counter() - t:.3f} s")
    torch_root = os.path.dirname(torch.__file__)
    print(subprocess.run(["grep", "-rln", "triton_key\\|torch_key", torch_root, "--include=*.py"], capture_output=True, text=True).stdout)
    t = time.perf_counter()
    codecache.torch_key()
    print(f"torch_key {time.perf_counter() - t:.3f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
