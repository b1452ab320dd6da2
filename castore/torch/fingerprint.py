"""The machine's compile environment as a flat dict of named fields: what PyTorch's cache keys depend on, for
people and tools comparing the machine a bundle was built on with the one about to use it."""

from __future__ import annotations

import os
import platform
import sys
import sysconfig

# Environment variables that change what torch.compile generates (and so its cache keys).
CACHE_FLAGS = (
    "TORCHINDUCTOR_MAX_AUTOTUNE",
    "TORCHINDUCTOR_FREEZING",
    "TORCHINDUCTOR_CPP_WRAPPER",
    "TORCHINDUCTOR_COORDINATE_DESCENT_TUNING",
    "TORCHINDUCTOR_FORCE_DISABLE_CACHES",
    "TORCH_COMPILE_DEBUG",
    "ATEN_CPU_CAPABILITY",
)


def _cpu_flags() -> str:
    """The vector ISA extensions the CPU reports (what Inductor's C++ backend picks its ISA from)."""
    wanted = ("avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "avx2", "fma", "sve", "asimd", "neon")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return ",".join(flag for flag in wanted if flag in have)
    except OSError:
        pass
    return ""


def machine_fingerprint() -> dict[str, str]:
    import torch

    fp = {
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda or ""),
        "python": platform.python_version(),
        "python_abi": str(sysconfig.get_config_var("SOABI") or sys.implementation.cache_tag),
        "machine": platform.machine(),
        "cpu_isa": _cpu_flags(),
    }
    try:
        import triton

        fp["triton"] = str(triton.__version__)
    except Exception:  # noqa: BLE001 - no Triton (CPU builds), or a broken one
        fp["triton"] = ""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        fp["gpu"] = torch.cuda.get_device_name()
        fp["gpu_capability"] = f"{major}.{minor}"
        try:
            fp["cuda_driver"] = str(torch._C._cuda_getDriverVersion())
        except Exception:  # noqa: BLE001 - private API, absent in some builds
            pass
    else:
        fp["gpu"] = ""
        fp["gpu_capability"] = ""
    try:
        fp["cpu_capability"] = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - older torch
        pass
    for name in CACHE_FLAGS:
        if name in os.environ:
            fp["flag." + name] = os.environ[name]
    return fp
