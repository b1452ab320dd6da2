"""The vector-ISA probe's verdict, shared through the store.

Before Inductor generates CPU code, it checks every vector ISA the CPU claims (``VecISA.__bool__``, six on
our 2-core machine). Each check builds a tiny .so, which ``artifacts`` serves from the store. It then starts a
child Python that dlopens the .so with torch's libraries, so that a broken toolchain cannot crash the compiling
process. Those children cost 0.6 s of a 4.1 s warm start on 2 cores, in every process, PyTorch's own warm
cache included (a py-spy profile, benchmarks/diag/profile_hot.py).

The verdict depends only on the probe binary, torch's libraries, the toolchain and the CPU. castore keys it by
all four, and stores passes only. A machine like one that has already probed skips the child; any difference
in the four is a different key, and PyTorch probes. A failed probe is never stored: it may be a timeout.
Torch versions without ``VecISA._probe_load`` keep their own probe.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import threading
from types import ModuleType
from typing import Any

from castore.torch.import_hooks import Patches
from castore.torch.session import StoreSession

CACHE = "isa-probe"
PASSED = b"castore isa-probe: passed\n"

_lock = threading.Lock()
probes_run = 0  # probe children PyTorch started in this process since install()


@functools.cache
def cpu_identity() -> str:
    """The CPU's model and feature flags (Linux), else what platform knows of it."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip()
                if name in ("model name", "Processor") and not model:
                    model = value.strip()
                elif name in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(value.split()))
                if model and flags:
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{model or platform.processor()}|{flags}"


def probe_key(isa: str, so_path: str) -> str | None:
    """The store key of a probe's verdict, or None when the probe binary cannot be read."""
    import torch

    from castore.torch.artifacts import toolchain_fingerprint

    try:
        with open(so_path, "rb") as f:
            binary = hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None
    material = repr((isa, binary, toolchain_fingerprint(), torch.__version__, torch.version.git_version, cpu_identity()))
    return f"isa.{isa}.{hashlib.sha256(material.encode()).hexdigest()[:40]}"


def _count_probe() -> None:
    global probes_run
    with _lock:
        probes_run += 1


def install(session: StoreSession, patches: Patches) -> None:
    """Serve ``VecISA._probe_load`` verdicts from the store, once Inductor's cpu_vec_isa is imported."""

    def on_cpu_vec_isa(cpu_vec_isa: ModuleType) -> None:
        vec_isa = cpu_vec_isa.VecISA
        original = vec_isa.__dict__.get("_probe_load")
        if original is None:
            return

        def probe_load(self: Any, output_path: str) -> bool:
            key = probe_key(str(self), output_path)
            if key is not None and session.get(CACHE, key) == PASSED:
                return True
            _count_probe()
            passed = original(self, output_path)
            if passed and key is not None:
                session.put(CACHE, key, PASSED, meta={"artifact": CACHE, "isa": str(self)})
            return passed

        patches.replace(vec_isa, "_probe_load", probe_load)

    patches.on_import("torch._inductor.cpu_vec_isa", on_cpu_vec_isa)
