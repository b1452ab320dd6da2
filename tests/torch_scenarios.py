"""Helpers for porting PyTorch's AOTAutograd-cache tests to castore: a fleet of simulated machines sharing one bucket.

A "machine" is what a fresh host of a fleet has: Dynamo reset, every in-memory compile cache cleared, a new empty
TORCHINDUCTOR_CACHE_DIR (and Triton dir), a new empty precompiled-header dir, a new empty castore local layer
(CASTORE_CACHE_DIR) and a fresh castore session (so ``castore.torch.stats()`` counts that machine only). The bucket
is the only thing machines share. PyTorch's ``counters`` are kept across machines, as the seed tests keep them
across their ``_clear_dynamo_and_codecache()`` calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import castore.torch


def clear_in_memory_caches() -> None:
    """The seed's ``_clear_all_caches`` minus the on-disk clears (a new machine has new dirs anyway)."""
    import torch
    import torch._dynamo
    from torch._functorch._aot_autograd.autograd_cache import AOTAutogradCache
    from torch._inductor.codecache import PyCodeCache
    from torch._inductor.utils import clear_caches
    from torch.compiler._cache import CacheArtifactManager

    torch._dynamo.reset()
    CacheArtifactManager.clear()
    PyCodeCache.cache_clear(purge=True)
    clear_caches()  # what fresh_cache() clears: every @clear_on_fresh_cache in-memory cache
    # functools.cache'd: it holds a RemoteAOTAutogradCache built from the previous session's backend class.
    AOTAutogradCache.get_remote_cache.cache_clear()


def dir_is_empty(path: Path) -> bool:
    return not path.exists() or not any(path.iterdir())


def cache_stats(name: str) -> dict[str, Any]:
    return castore.torch.stats().get("caches", {}).get(name, {})  # type: ignore[union-attr]


@dataclass
class Machine:
    name: str
    inductor_dir: Path
    header_dir: Path
    castore_dir: Path
    session: castore.torch.StoreSession

    def stats(self) -> dict[str, Any]:
        assert castore.torch.active_session() is self.session, f"{self.name} is not the active machine"
        return castore.torch.stats()

    def hits(self, cache: str) -> int:
        return int(self.stats()["caches"].get(cache, {}).get("hits", 0))  # type: ignore[union-attr]

    def bucket_fetches(self) -> int:
        return int(self.stats()["layers"]["bucket"]["fetches"])  # type: ignore[index]

    def flush(self) -> None:
        assert self.session.flush(30), "castore background writes did not finish"


class Fleet:
    """Machines that share one store URL. ``fleet.machine('b')`` turns this process into a fresh machine."""

    def __init__(self, url: str, root: Path, monkeypatch: pytest.MonkeyPatch, shared_headers: Path | None = None) -> None:
        self.url = url
        self.shared_headers = shared_headers
        self.root = root
        self.monkeypatch = monkeypatch
        self.current: Machine | None = None
        self.machines: list[Machine] = []

    def machine(self, name: str, *, warm_headers: bool = False) -> Machine:
        """A fresh machine. ``warm_headers``: reuse the session's precompiled headers (a builder machine whose
        PCH is not under test: saves a g++ header build per test; machines under test never get it)."""
        import torch._inductor.codecache as codecache

        self.leave()
        clear_in_memory_caches()
        base = self.root / name
        inductor_dir = base / "inductor"
        header_dir = self.shared_headers if warm_headers and self.shared_headers else base / "precompiled_headers"
        castore_dir = base / "castore"
        self.monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(inductor_dir))
        self.monkeypatch.setenv("TRITON_CACHE_DIR", str(inductor_dir / "triton"))
        self.monkeypatch.setenv("CASTORE_CACHE_DIR", str(castore_dir))
        # The precompiled headers live outside TORCHINDUCTOR_CACHE_DIR (computed at import): a fresh machine has none.
        self.monkeypatch.setattr(codecache, "_HEADER_DIR", str(header_dir))
        self.monkeypatch.setattr(codecache, "_HEADER_LOCK_DIR", str(header_dir / "locks"))
        for d in (inductor_dir, castore_dir) if header_dir == self.shared_headers else (inductor_dir, header_dir, castore_dir):
            assert dir_is_empty(d), f"{d} of a fresh machine is not empty"
        # slow_request: on 2 busy cores a SeaweedFS get can take seconds; the circuit breaker (tested elsewhere)
        # would then turn the store off mid-test and every counter below would be about the fallback instead.
        session = castore.torch.install(self.url, cache_dir=str(castore_dir), slow_request=120.0)
        m = Machine(name, inductor_dir, header_dir, castore_dir, session)
        self.current = m
        self.machines.append(m)
        return m

    def leave(self) -> None:
        """Finish the current machine's uploads and uninstall castore (the bucket keeps what it wrote)."""
        if self.current is not None:
            self.current.flush()
            castore.torch.uninstall()
            self.current = None

    def warm_up(self, timeout: float = 30.0) -> None:
        """Write and read one object first: a new SeaweedFS bucket allocates its volumes on the first write, and
        requests racing that allocation can fail; a failure inside a compile would open castore's circuit breaker."""
        import time

        deadline = time.monotonic() + timeout
        with self.store() as s:
            while True:
                try:
                    s.put("castore-test-probe", "probe", b"probe" * 100, overwrite=True)
                    assert s.get("castore-test-probe", "probe") == b"probe" * 100
                    s.delete("castore-test-probe", "probe")
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

    def store(self):  # noqa: ANN201 - castore.Store
        """A direct handle on the bucket (no local layer), as an operator would have."""
        import castore

        return castore.open_store(self.url, cache_size=0)

    def namespace(self) -> str:
        return castore.torch.default_namespace()

    def keys(self, prefix: str = "") -> list[str]:
        with self.store() as s:
            return sorted(k for _, k, _ in s.list(self.namespace()) if k.startswith(prefix))
