"""One 'machine start': compile a small model on CPU (forward + backward) and print what it cost, as JSON.

Run by tests/test_torch_fresh_machine.py in a process of its own, with its own TORCHINDUCTOR_CACHE_DIR,
TRITON_CACHE_DIR, TMPDIR and CASTORE_CACHE_DIR. With COMPILE_MODEL_CASTORE=1 (the default) castore.torch.install()
runs first, configured from CASTORE_* in the environment; with 0, torch.compile runs without castore.

The last stdout line is ``RESULT {json}``: checksums of the output and of every gradient, compiler runs (every
C++ compiler process, counted, also without castore), PyTorch's cache counters, castore's stats, timings.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

t_start = time.perf_counter()
USE_CASTORE = os.environ.get("COMPILE_MODEL_CASTORE", "1") == "1"

import torch  # noqa: E402

if USE_CASTORE:
    import castore.torch
    import castore.torch.artifacts
    import castore.torch.isa_probe

    castore.torch.install()
    _plain_runs = None
else:  # count compiler runs the same way castore does (docs/dev/torch-internals.md section 3)
    import torch._inductor.cpp_builder as _cb

    _plain_runs = [0]
    _original_run = _cb.run_compile_cmd

    def _counted(cmd_line: str, cwd: str) -> None:
        _plain_runs[0] += 1
        return _original_run(cmd_line, cwd)

    _cb.run_compile_cmd = _counted

from torch._dynamo.utils import counters  # noqa: E402

t_imported = time.perf_counter()


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:24]


torch.manual_seed(0)
layers: list[torch.nn.Module] = []
for _ in range(3):
    layers += [torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.LayerNorm(256)]
model = torch.nn.Sequential(*layers)
x = torch.randn(32, 256)
compiled = torch.compile(model)

t0 = time.perf_counter()
y = compiled(x)
y.sum().backward()
t1 = time.perf_counter()

flushed = True
if USE_CASTORE:
    session = castore.torch.active_session()
    flushed = session.flush(float(os.environ.get("COMPILE_MODEL_FLUSH_TIMEOUT", "60"))) if session else True
t2 = time.perf_counter()

result = {
    "castore": USE_CASTORE,
    "pid": os.getpid(),
    "output": digest(y),
    "grads": {name: digest(p.grad) for name, p in model.named_parameters()},
    "output_sum": float(y.detach().double().sum()),
    "compiler_runs": castore.torch.artifacts.compiler_runs if USE_CASTORE else _plain_runs[0],  # type: ignore[index]
    # ISA probe children (a child Python dlopening the probe .so) started in this process, where castore hooks them
    "isa_probes_run": castore.torch.isa_probe.probes_run if USE_CASTORE else None,
    "isa_probe_hooked": USE_CASTORE and hasattr(torch._inductor.cpu_vec_isa.VecISA, "_probe_load"),
    "counters": {
        "inductor": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph")},
        "aot_autograd": {k: v for k, v in counters["aot_autograd"].items() if k.startswith("autograd_cache")},
    },
    "stats": castore.torch.stats() if USE_CASTORE else {},
    "flushed": flushed,
    "seconds": {
        "import": round(t_imported - t_start, 3),
        "compile_and_first_step": round(t1 - t0, 3),
        "flush": round(t2 - t1, 3),
        "total": round(t2 - t_start, 3),
    },
}
sys.stdout.flush()
print("RESULT " + json.dumps(result), flush=True)
