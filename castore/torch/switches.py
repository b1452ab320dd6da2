"""Which of PyTorch's remote caches castore turns on, and the user's opt-outs.

castore turns each remote cache on twice: in the environment of the job (every process, compile workers included,
reads it when its config module is imported) and in-process (a config module imported before install()). A cache
the user turned off (its variable set to "0", or its config set to False) stays off, both ways.

The remote AOTAutograd cache is never on while the remote FX graph cache is off. An AOTAutograd entry names the FX
graph it needs; with the FX entry only on the machine that wrote it, another machine's AOTAutograd hit fails to
load its graph: PyTorch raises FXGraphCacheMiss (an error under ``strict_autograd_cache=True``), looks the graph up
twice per fallback, and ``CompiledArtifact.save`` finds more than one artifact.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from types import ModuleType
from typing import Any

from castore.torch.import_hooks import Patches

log = logging.getLogger("castore.torch")

FX_ENV = "TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE"
AOT_ENV = "TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE"
# Exported to every process of the job. The flags are part of PyTorch's cache keys: every machine of a fleet must
# set them alike, so castore does.
TORCH_ENV = {FX_ENV: "1", AOT_ENV: "1", "TORCHINDUCTOR_AUTOTUNE_REMOTE_CACHE": "1"}
# In-process switches of the same caches: (config module, attribute, the variable PyTorch reads it from). PGO's
# remote cache is used only when TORCH_COMPILE_JOB_ID names the job, as PyTorch requires.
SWITCHES = [
    ("torch._inductor.config", "fx_graph_remote_cache", FX_ENV),
    ("torch._inductor.config", "autotune_remote_cache", "TORCHINDUCTOR_AUTOTUNE_REMOTE_CACHE"),
    ("torch._functorch.config", "enable_remote_autograd_cache", AOT_ENV),
    ("torch._dynamo.config", "automatic_dynamic_remote_pgo", "TORCH_DYNAMO_AUTOMATIC_DYNAMIC_REMOTE_PGO"),
]
# Modules that bind should_use_remote_autograd_cache, PyTorch's decision to use the remote AOTAutograd cache.
AOT_DECIDERS = (
    "torch._functorch._aot_autograd.autograd_cache",
    "torch._functorch._aot_autograd.graph_compile",
    "torch._functorch.aot_autograd",
)
OFF = "0"  # what PyTorch reads as off (torch.utils._config_module.get_tristate_env)

_said_aot_off = False


def export(env: MutableMapping[str, str]) -> None:
    """Turn the remote caches on in a job's environment, leaving every variable the user set as it is."""
    if env.get(FX_ENV) == OFF:
        env.setdefault(AOT_ENV, OFF)
    for name, value in TORCH_ENV.items():
        env.setdefault(name, value)


def install(patches: Patches, environ: Mapping[str, str] | None = None) -> None:
    """Turn the remote caches on in this process, as each config module is imported, except those opted out."""
    environ = os.environ if environ is None else environ  # the user's, read before install() exports castore's
    fx_off = _fx_remote_off(environ)
    for module_name, attr, env_name in SWITCHES:
        if environ.get(env_name) == OFF:
            continue
        if env_name == AOT_ENV and fx_off:
            _say_aot_off(f"{FX_ENV}=0" if environ.get(FX_ENV) == OFF else "fx_graph_remote_cache=False")
            continue
        patches.on_import(module_name, lambda module, attr=attr: _switch_on(patches, module, attr))
    for module_name in AOT_DECIDERS:
        patches.on_import(module_name, lambda module: _gate_remote_aot(patches, module))


def _fx_remote_off(environ: Mapping[str, str]) -> bool:
    config = sys.modules.get("torch._inductor.config")
    return environ.get(FX_ENV) == OFF or getattr(config, "fx_graph_remote_cache", None) is False


def _switch_on(patches: Patches, config_module: Any, name: str) -> None:
    if not hasattr(config_module, name):  # a switch this torch version does not have
        return
    if getattr(config_module, name) is False:  # turned off by the user (code, or the variable at import)
        return
    if name == "enable_remote_autograd_cache" and _fx_remote_off({}):
        _say_aot_off("fx_graph_remote_cache=False")
        return
    patches.replace(config_module, name, True)


def _gate_remote_aot(patches: Patches, module: ModuleType) -> None:
    """PyTorch's decision to use the remote AOTAutograd cache, and the remote FX graph cache on, checked at each
    compile: a job (or a test) may turn the FX one off after install(), with ``inductor_config.patch``."""
    decide = getattr(module, "should_use_remote_autograd_cache", None)
    if decide is None or getattr(decide, "castore_gate", False):
        return

    def should_use_remote_autograd_cache() -> bool:
        if not decide():
            return False
        from torch._inductor.utils import should_use_remote_fx_graph_cache

        if should_use_remote_fx_graph_cache():
            return True
        _say_aot_off("the remote FX graph cache is off")
        return False

    should_use_remote_autograd_cache.castore_gate = True  # type: ignore[attr-defined]
    patches.replace(module, "should_use_remote_autograd_cache", should_use_remote_autograd_cache)


def _say_aot_off(reason: str) -> None:
    global _said_aot_off
    if not _said_aot_off:
        _said_aot_off = True
        log.info("castore: %s, so the remote AOTAutograd cache is off too (its entries need the FX graph's)", reason)
