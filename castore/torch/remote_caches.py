"""PyTorch's five remote caches, served by castore through ``RemoteCache.backend_override_cls``."""

from __future__ import annotations

import base64
import json
import logging
import re
from types import ModuleType
from typing import Any

from castore.torch.import_hooks import Patches
from castore.torch.session import StoreSession

log = logging.getLogger("castore.torch")

# RemoteCache subclass in torch._inductor.remote_cache -> castore's name for the cache.
CACHES = {
    "RemoteFxGraphCache": "fx-graph",
    "RemoteAOTAutogradCache": "aot-autograd",
    "RemoteAutotuneCache": "autotune",
    "RemoteBundledAutotuneCache": "bundled-autotune",
    "RemoteDynamoPGOCache": "dynamo-pgo",
}
# castore cache -> the PyTorch cache class whose _write_to_local_cache(key, content) stores a local entry.
_LOCAL_WRITERS = {
    "fx-graph": ("torch._inductor.codecache", "FxGraphCache"),
    "aot-autograd": ("torch._functorch._aot_autograd.autograd_cache", "AOTAutogradCache"),
}
_KEY_RE = re.compile(r"pt2:(?P<cache_id>.+?)::(?P<key>.+):c\d+")


def make_backend_class(session: StoreSession, cache: str) -> type:
    """A RemoteCacheBackend subclass bound to one castore cache name (a zero-argument factory for torch)."""
    from torch._inductor.remote_cache import RemoteCacheBackend

    class CastoreRemoteCacheBackend(RemoteCacheBackend[bytes]):
        def __init__(self) -> None:
            super().__init__()
            self._name = f"backend:castore:{cache}"

        def _get(self, key: str) -> bytes | None:
            data = session.get(cache, key)
            if data is not None:
                _after_hit(session, cache, key, data)
            return data

        def _put(self, key: str, data: bytes) -> None:
            session.put(cache, key, data, meta=session_meta())

    CastoreRemoteCacheBackend.__name__ = CastoreRemoteCacheBackend.__qualname__ = f"Castore_{cache.replace('-', '_')}"
    return CastoreRemoteCacheBackend


_meta_cache: dict[str, object] | None = None


def session_meta() -> dict[str, object]:
    """What castore records about the writer's environment (FORMAT.md 'Metadata'); never part of a key."""
    global _meta_cache
    if _meta_cache is None:
        import platform

        import torch

        meta: dict[str, object] = {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": f"{platform.system()}-{platform.machine()}",
            "cuda": torch.version.cuda or "",
        }
        try:
            import triton

            meta["triton"] = triton.__version__
        except Exception:  # noqa: BLE001 - triton is optional
            meta["triton"] = ""
        try:
            meta["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        except Exception:  # noqa: BLE001
            meta["device"] = "unknown"
        _meta_cache = meta
    return {**_meta_cache, **_fingerprint_meta()}


def _fingerprint_meta() -> dict[str, object]:
    """This machine's environment fingerprint as env.* fields (what ``castore doctor`` compares); never fails a put."""
    try:
        from castore.torch.fingerprint import current_meta

        return current_meta()
    except Exception as exc:  # noqa: BLE001 - the fingerprint is a diagnosis aid only
        log.debug("castore: no environment fingerprint: %s", exc)
        return {}


def _after_hit(session: StoreSession, cache: str, key: str, data: bytes) -> None:
    """Count the compile time a hit saved, and write FX/AOT hits into PyTorch's local cache dirs."""
    match = _KEY_RE.fullmatch(key)
    try:
        doc: Any = json.loads(data)
    except ValueError:
        return
    if isinstance(doc, dict) and isinstance(doc.get("time_taken_ms"), (int, float)):
        session.note_saved(cache, doc["time_taken_ms"] / 1000.0)
    writer = _LOCAL_WRITERS.get(cache)
    if writer is None or match is None or not isinstance(doc, dict) or "data" not in doc:
        return
    # Only the entry file, not MegaCache's populate_cache(): that also re-emits the Triton bundle, which the hit
    # itself has just done (seconds of unpickling on a GPT-2 training graph). Written in the background: the
    # copy serves the node's next process, not this one.
    session.defer(_write_local, writer, match.group("key"), doc["data"])


def _write_local(writer: tuple[str, str], key: str, data: str | bytes) -> None:
    import importlib

    try:
        cls = getattr(importlib.import_module(writer[0]), writer[1])
        cls._write_to_local_cache(key, base64.b64decode(data))
    except Exception as exc:  # noqa: BLE001 - the local copy is an optimisation only
        log.debug("castore: could not write %s entry %s locally: %s", writer[1], key, exc)


def install(session: StoreSession, patches: Patches) -> None:
    """Point every remote cache class at castore once Inductor's remote_cache module is imported."""

    def on_remote_cache(rc: ModuleType) -> None:
        for class_name, cache in CACHES.items():
            cls = getattr(rc, class_name, None)
            if cls is not None:  # else a cache this torch version does not have
                patches.replace(cls, "backend_override_cls", make_backend_class(session, cache))

    patches.on_import("torch._inductor.remote_cache", on_remote_cache)
