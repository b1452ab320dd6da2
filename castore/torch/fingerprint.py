"""The environment fingerprint: what of this machine enters PyTorch's cache keys, as a flat dict of named fields.

Two machines whose fingerprints differ miss each other's entries, whatever castore does: the torch build, Triton,
CUDA, the GPU's architecture, the CPU's vector ISA, Python and the compile flags are all part of PyTorch's keys
(``FxGraphHashDetails``, ``AOTAutogradCacheDetails``, ``CacheBase.get_system``) or of castore's own (C++ kernels,
the ISA probe). Every entry records the fingerprint of its writer in its manifest's meta (``env.<field>``), and
``castore doctor`` compares this machine's against them. Nothing here compiles or starts a process.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import sys
import sysconfig
from typing import Any

META_PREFIX = "env."
# Inductor settings that enter PyTorch's FX graph cache key and that users change on purpose. Every other one is
# covered by inductor_config_hash.
INDUCTOR_FLAGS = (
    "max_autotune",
    "max_autotune_gemm",
    "coordinate_descent_tuning",
    "freezing",
    "cpp_wrapper",
    "fallback_random",
    "triton.cudagraphs",
    "cpp.simdlen",
)
FUNCTORCH_FLAGS = ("activation_memory_budget",)
# Switches castore itself sets on every machine (castore.torch.SWITCHES): alike everywhere, so left out of the hashes.
_CASTORE_SWITCHES = {
    "fx_graph_remote_cache",
    "autotune_remote_cache",
    "enable_remote_autograd_cache",
    "bundled_autotune_remote_cache",
}

Fingerprint = dict[str, str | int | float | bool | None]
MAX_CHANGED_CHARS = 4000


@functools.cache
def _static() -> dict[str, Any]:
    """The fields that cannot change while a process runs."""
    import torch

    fp: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_git": torch.version.git_version or "",
        "triton": _triton_version(),
        "cuda": torch.version.cuda or "",
        "hip": getattr(torch.version, "hip", None) or "",
        "cpu_arch": platform.machine(),
        "python": platform.python_version(),
        "python_abi": sysconfig.get_config_var("SOABI") or sys.implementation.cache_tag or "",
        "os": f"{platform.system()} {'-'.join(platform.libc_ver()) or ''}".strip(),
    }
    fp.update(_gpu())
    return fp


def _triton_version() -> str:
    try:
        import triton

        return str(triton.__version__)
    except Exception:  # noqa: BLE001 - triton is optional (CPU builds)
        return ""


def _gpu() -> dict[str, Any]:
    """The GPU in use: name, compute capability and the index this process compiles for ('' on CPU machines)."""
    import torch

    try:
        if torch.cuda.is_available():
            index = torch.cuda.current_device()
            major, minor = torch.cuda.get_device_capability(index)
            return {"gpu_name": torch.cuda.get_device_name(index), "gpu_capability": f"{major}.{minor}", "gpu_index": index}
    except Exception:  # noqa: BLE001, S110 - a broken driver is a CPU machine for the fingerprint
        pass
    return {"gpu_name": "", "gpu_capability": "", "gpu_index": ""}


def cpu_isa() -> str:
    """The vector ISA Inductor generates CPU code for, without compiling anything.

    Inductor's pick_vec_isa() checks each candidate by compiling a probe; when this process has done that already,
    its answer is reused. Otherwise: the widest of Inductor's ISAs whose CPU features torch reports, then the
    same ATEN_CPU_CAPABILITY and cpp.simdlen overrides pick_vec_isa() applies.
    """
    import sys as _sys

    vec = _sys.modules.get("torch._inductor.cpu_vec_isa")
    if vec is not None and vec.valid_vec_isa_list.cache_info().currsize:
        return str(vec.pick_vec_isa()) or "none"
    from torch._inductor import cpu_vec_isa as vec

    arch = platform.machine()
    if arch in ("x86_64", "AMD64"):
        # valid_vec_isa_list() without its compile check: the ISAs whose CPU features torch reports, widest first.
        have = vec.x86_isa_checker()
        valid = [isa for isa in vec.supported_vec_isa_list if str(isa) and all(f in have for f in str(isa).split())]
    elif arch == "aarch64":
        valid = vec.valid_vec_isa_list()  # no compile check on ARM: it reads torch's capabilities
    else:
        valid = []
    if not valid:
        return "none"
    simdlen = config_value("torch._inductor.config", "cpp.simdlen")
    if simdlen is not None:
        return next((str(isa) for isa in valid if isa.bit_width() == simdlen), "none")
    picked = vec.get_isa_from_cpu_capability(os.environ.get("ATEN_CPU_CAPABILITY"), valid, vec.invalid_vec_isa)
    return str(picked) or "none"


def config_value(module_name: str, dotted: str) -> Any:
    """A setting of a torch config module by dotted name (``cpp.simdlen``), None where there is none."""
    import importlib

    obj: Any = importlib.import_module(module_name)
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _config_hash(module_name: str) -> str:
    """A hash of a torch config module's portable values (what PyTorch hashes into its keys), castore's own
    switches left out."""
    import importlib

    module = importlib.import_module(module_name)
    try:
        values = module.save_config_portable()
    except Exception:  # noqa: BLE001 - a torch without save_config_portable
        return ""
    values = {k: v for k, v in values.items() if k.rsplit(".", 1)[-1] not in _CASTORE_SWITCHES}
    text = json.dumps(values, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _changed(module_name: str) -> str:
    """The settings of a torch config module that differ from PyTorch's defaults and enter its keys, as sorted JSON
    (names what a differing hash stands for: a flag, or a path set in the config)."""
    import importlib

    module = importlib.import_module(module_name)
    try:
        portable = module.save_config_portable()
        changed = module._get_dict(skip_default=True)
    except Exception:  # noqa: BLE001 - a torch without these
        return ""
    # PyTorch assigns some settings their default value while it compiles (deterministic, comprehensive_padding).
    # Only a value unlike the default counts, or a machine would differ from the writers only for having compiled.
    entries = getattr(module, "_config", {})
    values = {
        k: v for k, v in changed.items()
        if k in portable and k.rsplit(".", 1)[-1] not in _CASTORE_SWITCHES and not _is_default(entries.get(k), v)
    }
    return json.dumps(values, sort_keys=True, default=repr)[:MAX_CHANGED_CHARS]


def _is_default(entry: Any, value: Any) -> bool:
    try:
        return entry is not None and bool(entry.default == value)
    except Exception:  # noqa: BLE001 - a default that cannot be compared: keep the setting
        return False


def _scalar(value: Any) -> str | int | float | bool | None:
    return value if value is None or isinstance(value, (str, int, float, bool)) else repr(value)


def _flags() -> dict[str, str | int | float | bool | None]:
    """The named compile settings, as fingerprint fields."""
    flags = {f"flag.inductor.{n}": _scalar(config_value("torch._inductor.config", n)) for n in INDUCTOR_FLAGS}
    flags.update({f"flag.functorch.{n}": _scalar(config_value("torch._functorch.config", n)) for n in FUNCTORCH_FLAGS})
    return flags


def fingerprint() -> Fingerprint:
    """This machine's fingerprint now (the flags are read at each call: a process may change them)."""
    fp: Fingerprint = dict(_static())
    fp["cpu_isa"] = cpu_isa()
    fp["aten_cpu_capability"] = os.environ.get("ATEN_CPU_CAPABILITY", "")
    fp.update(_flags())
    fp["inductor_config_hash"] = _config_hash("torch._inductor.config")
    fp["functorch_config_hash"] = _config_hash("torch._functorch.config")
    fp["inductor_changed"] = _changed("torch._inductor.config")
    fp["functorch_changed"] = _changed("torch._functorch.config")
    return fp


def as_meta(fp: Fingerprint | None = None) -> dict[str, object]:
    """The fingerprint as manifest meta fields (``env.<field>``)."""
    return {META_PREFIX + k: v for k, v in (fp if fp is not None else fingerprint()).items()}


_meta_memo: tuple[tuple[Any, ...], dict[str, object]] | None = None


def current_meta() -> dict[str, object]:
    """``as_meta()`` for every put: computed again only when the config modules' hashes, the flags, the ISA or
    ATEN_CPU_CAPABILITY changed. The config hashes serialize every setting (7 to 10 ms a put on the GPU host,
    0.4 s of a ResNet-50 compile's main thread over its autotune results); PyTorch's own ``get_hash()`` is cached
    until a setting changes. A setting PyTorch marks compile_ignored leaves its hash alike: changed alone, it
    shows in the recorded hashes at the next change of another."""
    global _meta_memo
    stamp = _config_stamp()
    memo = _meta_memo
    if stamp is not None and memo is not None and memo[0] == stamp:
        return memo[1]
    meta = as_meta()
    if stamp is not None:
        _meta_memo = (stamp, meta)
    return meta


def _config_stamp() -> tuple[Any, ...] | None:
    """What current_meta()'s fields follow, cheap to read; None where a config module has no get_hash()."""
    import importlib

    stamp: list[Any] = [cpu_isa(), os.environ.get("ATEN_CPU_CAPABILITY", "")]
    for name in ("torch._inductor.config", "torch._functorch.config"):
        get_hash = getattr(importlib.import_module(name), "get_hash", None)
        if get_hash is None:
            return None
        stamp.append(get_hash())
    stamp.extend(_flags().values())
    return tuple(stamp)


def from_meta(meta: dict[str, object]) -> Fingerprint:
    """The writer's fingerprint recorded in an entry's meta. Entries written before fingerprints were recorded
    give what their older meta fields tell (torch, triton, cuda, python)."""
    fp: Fingerprint = {k[len(META_PREFIX) :]: v for k, v in meta.items() if k.startswith(META_PREFIX)}  # type: ignore[misc]
    if not fp:
        for name in ("torch", "triton", "cuda", "python"):
            if name in meta:
                fp[name] = meta[name]  # type: ignore[assignment]
    return fp


__all__ = ["META_PREFIX", "Fingerprint", "as_meta", "cpu_isa", "current_meta", "fingerprint", "from_meta"]


def machine_fingerprint() -> dict[str, str]:
    """This machine's fingerprint with every value as text: what a prewarm bundle records of the machine that
    built it (castore.bundles), in the same fields as an entry's ``env.<field>`` meta."""
    return {name: "" if value is None else str(value) for name, value in fingerprint().items()}
