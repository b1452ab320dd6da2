"""Checking and measuring a whole store: verify (and repair) every object, and the usage behind `castore du`.

Both read every manifest of the store (or of one namespace) and the chunk objects they name, as the bucket holds
them; they sit beside the store's read and write paths, not inside them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from castore.errors import FormatError, ReadOnlyError
from castore.format import codec as codecs
from castore.format import keys

if TYPE_CHECKING:
    from castore.store import Store

log = logging.getLogger("castore.store")


@dataclass
class VerifyReport:
    manifests: int = 0
    chunks: int = 0
    bytes: int = 0
    bad: list[str] = field(default_factory=list)  # every problem found
    repaired: list[str] = field(default_factory=list)  # chunk objects uploaded again from a valid local copy
    removed: list[str] = field(default_factory=list)  # objects deleted: beyond repair, or needing what was
    unresolved: int = 0  # problems a repair could not fix (without --repair: every problem)

    @property
    def ok(self) -> bool:
        return not self.bad


@dataclass
class Usage:
    manifests: int = 0
    logical_bytes: int = 0  # sum of blob sizes over all manifests
    referenced_bytes: int = 0  # sum of unique chunk sizes the manifests reference (after dedup)
    stored_bytes: int = 0  # bytes of chunk objects and manifests in the bucket (after dedup and compression)
    chunk_objects: int = 0

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.referenced_bytes if self.referenced_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else 1.0


def verify(store: Store, namespace: str | None = None, key: str | None = None, *, repair: bool = False) -> VerifyReport:
    """Re-hash every chunk of one key, or of every manifest (and every chunk object) in the store, as the
    bucket holds them (not the local layer's copies).

    With repair: a corrupt or missing chunk is uploaded again from a valid copy in the local layer; a chunk
    object beyond repair is deleted, with every manifest that needs it and every unusable manifest, so the
    next writer (the next compile) publishes the entry again.
    """
    if repair and store.read_only:
        raise ReadOnlyError(f"store {store.url} is read-only")
    report = VerifyReport()
    bucket = store._bucket
    if key is not None:
        assert namespace is not None
        targets = [(namespace, key)]
    else:
        targets = [(ns, k) for ns, k, _ in store.list(namespace)]
    usable: dict[bytes, bool] = {}  # digest -> a valid copy is in the bucket (after any repair)
    lock = threading.Lock()

    def problem_of(obj: bytes | None, digest: bytes, size: int | None) -> str | None:
        if obj is None:
            return "missing"
        try:
            if size is not None:
                codecs.decode_chunk(obj, digest, size)
            else:
                store._admission_check(keys.chunk_path(digest), obj)
        except FormatError as exc:
            return str(exc)
        return None

    def check(digest: bytes, size: int | None) -> bool:
        path = keys.chunk_path(digest)
        obj = bucket.get(path)
        problem = problem_of(obj, digest, size)
        ok = problem is None
        if problem is not None:
            with lock:
                report.bad.append(f"chunk {digest.hex()}: {problem}")
            if repair:
                ok = _repair_chunk(store, digest, size, problem_of)
                with lock:
                    if ok:
                        report.repaired.append(f"chunk {digest.hex()}")
                    elif obj is not None:
                        report.removed.append(f"chunk {digest.hex()}")
                if not ok and obj is not None:
                    store.backend.delete(path)
        with lock:
            report.chunks += 1
            if obj is not None and ok:
                report.bytes += size if size is not None else 0
            if not ok and not repair:
                report.unresolved += 1
        return ok

    def remove_manifest(ns: str, k: str) -> None:
        if repair:
            store.backend.delete(keys.manifest_path(ns, k))
            store._forgive(keys.manifest_path(ns, k))
            report.removed.append(f"manifest {ns}/{k}")
        else:
            report.unresolved += 1

    for ns, k in targets:
        raw = bucket.get(keys.manifest_path(ns, k))
        if raw is None:
            report.bad.append(f"manifest {ns}/{k}: missing")
            report.unresolved += 1
            continue
        try:
            manifest = store._parse_manifest(raw, ns, k)
        except FormatError as exc:
            report.bad.append(f"manifest {ns}/{k}: {exc}")
            remove_manifest(ns, k)
            continue
        report.manifests += 1
        if manifest.inline is not None:
            if store._inline_data(manifest) is None:
                report.bad.append(f"manifest {ns}/{k}: inline data corrupt")
                remove_manifest(ns, k)
            continue
        new = list({ref.digest: ref for ref in manifest.chunks if ref.digest not in usable}.values())
        for ref, ok in zip(new, store._pool.map(lambda r: check(r.digest, r.size), new)):
            usable[ref.digest] = ok
        lost = [ref.digest.hex() for ref in manifest.chunks if not usable[ref.digest]]
        if lost:
            if repair:
                report.bad.append(f"manifest {ns}/{k}: needs {len(set(lost))} unusable chunk(s)")
            remove_manifest(ns, k)
    if key is None and namespace is None:
        # Whole store: also every chunk object no manifest names.
        for path, _ in bucket.list(keys.ROOT + "/chunks/"):
            digest = keys.parse_chunk_path(path)
            if digest is None or digest in usable:
                continue
            usable[digest] = check(digest, None)
    if repair:
        report.unresolved = 0  # every problem was repaired or removed (a failure raises)
    return report

def _repair_chunk(store: Store, digest: bytes, size: int | None, problem_of: Callable[[bytes | None, bytes, int | None], str | None]) -> bool:
    """Upload a chunk again from a valid local-layer copy. False when this node holds none."""
    if store.local is None:
        return False
    path = keys.chunk_path(digest)
    local_copy = store.local.local_copy(path)
    if local_copy is None:
        return False
    if problem_of(local_copy, digest, size) is not None:
        store.local.forget(path)
        return False
    store._bucket.put(path, local_copy)
    store._forgive(path)
    log.warning("castore: chunk %s repaired from this node's local layer", digest.hex())
    return True

def du(store: Store, namespace: str | None = None) -> Usage:
    usage = Usage()
    unique: dict[bytes, int] = {}
    for ns, k, msize in store.list(namespace):
        try:
            manifest = store.stat(ns, k)
        except FormatError:
            continue
        if manifest is None:
            continue
        usage.manifests += 1
        usage.logical_bytes += manifest.size
        usage.stored_bytes += msize
        if manifest.inline is not None:
            usage.referenced_bytes += manifest.size
        for ref in manifest.chunks:
            if ref.digest not in unique:
                unique[ref.digest] = ref.stored_size
                usage.referenced_bytes += ref.size
    usage.chunk_objects = len(unique)
    usage.stored_bytes += sum(unique.values())
    return usage
