"""What the hot-load benchmark measures: its modes, the models of each device, how a model is named on the
command line, and the record of one measured process (:class:`Run`).

The modes are described in ``MODE_DESCRIPTIONS`` (``castore bench --help`` shows them). Populating runs (one
castore cold run into the bucket, one Redis cold run, one ahead-of-time castore cold run) are recorded as
``castore-cold``, ``redis-cold`` and ``castore-aot-cold``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

MODES = ["cold", "cold-writer", "warm-local", "castore-hot", "castore-warm", "castore-hot+rtt", "redis-remote", "megacache", "castore-aot"]
QUICK_MODES = ["cold", "warm-local", "castore-hot"]
POPULATE_MODES = {"castore": "castore-cold", "redis": "redis-cold", "castore-aot": "castore-aot-cold"}
# The classic four of each device, then the wider shapes: dynamic shapes over several lengths, a Llama-style
# training step, a vision transformer, and max-autotune.
WIDER_MODELS = ["gpt-dynamic:infer", "llama:train", "vit:infer", "mlp-autotune:infer"]
CPU_MODELS = ["transformer:infer", "transformer:train", "cnn:infer", "cnn:train"] + WIDER_MODELS
GPU_MODELS = ["gpt2:infer", "gpt2:train", "resnet50:infer", "gpt2-autotune:infer"] + WIDER_MODELS
DEDUP_VARIANTS = {  # (layers, batch): one model, two depths and two batch sizes
    "cpu": ("transformer", [(2, 4), (4, 4), (2, 8), (4, 8)]),
    "cuda": ("gpt2", [(6, 4), (12, 4), (6, 8), (12, 8)]),
}
REDIS_FLAGS = ("TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE", "TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE", "TORCHINDUCTOR_AUTOTUNE_REMOTE_CACHE")
BREAKER_MESSAGE = "compiling without the store"  # castore's log line when its circuit breaker opens


def modes_to_run(requested: list[str]) -> list[str]:
    """The requested modes with their references, in MODES order: cold always; warm-local, the reference of every
    mode but the writer's (whose reference is cold), unless only cold-writer was asked for."""
    unknown = set(requested) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes: {', '.join(sorted(unknown))} (choose from {', '.join(MODES)})")
    references = {"cold", "warm-local"} if set(requested) - {"cold", "cold-writer"} else {"cold"}
    return [m for m in MODES if m in set(requested) | references]


MODE_DESCRIPTIONS = {  # for --help
    "cold": "no caches anywhere; also saves a MegaCache bundle",
    "cold-writer": "cold, with castore on and writing into an empty bucket (what the first machine of a fleet pays)",
    "warm-local": "PyTorch's own local caches, filled by the cold run (castore off)",
    "castore-hot": "a fresh machine (empty local dirs, empty castore local layer), the bucket filled",
    "castore-warm": "castore's local layer filled, PyTorch's dirs empty",
    "castore-hot+rtt": "castore-hot with --rtt-ms (30 ms) added to every S3 request (a fault proxy on loopback)",
    "redis-remote": "PyTorch's Redis remote caches (a real redis-server), fresh dirs",
    "megacache": "torch.compiler.load_cache_artifacts of the cold run's bundle, fresh dirs",
    "castore-aot": "castore-hot through castore.torch.aot_compile (--aot): the stored ahead-of-time function is "
    "loaded, Dynamo's trace skipped; bucket filled by a castore-aot-cold run",
}

PHASES = ("infer", "train")


def uses_store(mode: str) -> bool:
    """The mode's processes run with castore on (and need the benchmark's S3 server)."""
    return mode.startswith("castore") or mode == "cold-writer"


def split_model_spec(spec: str) -> tuple[str, str]:
    """(model, phase) of ``model[:phase]``, where model is a built-in name or your own FILE.py:FUNCTION or
    MODULE:FUNCTION (see castore.bench.models); the phase defaults to infer."""
    model, sep, phase = spec.strip().rpartition(":")
    if sep and phase in PHASES:
        return model, phase
    return spec.strip(), "infer"


def resolve_model_spec(spec: str) -> str:
    """``model:phase`` with the phase spelled out and a FILE.py made absolute (the processes run elsewhere)."""
    from castore.bench.models import factory_file

    model, phase = split_model_spec(spec)
    target = factory_file(model)
    if target is not None:
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise SystemExit(f"--models {spec!r}: no file {path}")
        model = path + model[len(target) :]
    return f"{model}:{phase}"


def model_slug(model: str) -> str:
    """A model (or model:phase) in file and folder names; a FILE.py by its file's stem."""
    parts = [os.path.splitext(os.path.basename(p))[0] if p.endswith(".py") else p for p in model.split(":")]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", ":".join(parts))[:80]


@dataclass
class Run:
    """One measured process (or one that could not run, with the reason in ``error``)."""

    model: str
    mode: str  # measured mode, or castore-cold / redis-cold (populating runs), or dedup-<variant>
    repeat: int
    ok: bool = False
    returncode: int | None = None
    wall_seconds: float = 0.0
    error: str | None = None
    result: dict[str, Any] | None = None
    stderr_tail: str = ""
    argv: list[str] = field(default_factory=list)
    breaker: bool = False  # castore said it compiled without the store (circuit breaker opened)
    call: str | None = None  # run_id of the benchmark command that measured it (results pooled by --merge)

    def to_dict(self) -> dict[str, Any]:
        keys = ("model", "mode", "repeat", "ok", "returncode", "wall_seconds", "error", "breaker", "argv", "result", "stderr_tail", "call")
        return {k: getattr(self, k) for k in keys}


NOT_STARTED = "not run: past --deadline"


def run_of(run: dict[str, Any]) -> Run:
    """The Run a report's JSON holds."""
    return Run(**{k: v for k, v in run.items() if k in Run.__dataclass_fields__})
