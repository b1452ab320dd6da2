"""Garbage collection: what the bucket really holds, old entries expired, unreferenced chunk objects swept.

Store level: knows manifests, bundles and chunk objects, nothing of torch. The protocol that keeps a writer
racing gc from losing a chunk is normative (docs/FORMAT.md section 5); this module holds both of its sides:
the writer's (:func:`needs_refresh`, :func:`publish_in_time`, :func:`recheck_refreshed`, called from
``Store._put``) and gc's (:func:`collect`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from castore.backends.base import Backend, ObjectInfo
from castore.errors import BackendError, CastoreError, ConfigError, FormatError, ReadOnlyError, UnsupportedFormatVersion
from castore.format import keys
from castore.format.manifest import Manifest

if TYPE_CHECKING:
    from castore.store import Store

log = logging.getLogger(__name__)

#: R: a writer that reuses a chunk object older than this re-uploads it (its modification time becomes now).
REFRESH_AGE = 6 * 3600.0
#: G: gc removes an unreferenced chunk object only when it is older than this.
DEFAULT_GRACE = 48 * 3600.0
#: D: gc receives the answer to a candidate's DELETE within this many seconds of sending its HEAD; a writer
#: re-checks the chunks it refreshed this long after re-uploading them.
DELETE_WINDOW = 2.0
#: S3's Last-Modified has whole seconds: an object may be up to this much younger than it reads.
MTIME_RESOLUTION = 1.0
#: The clock difference between writers, gc and the object store that the protocol tolerates.
CLOCK_SKEW = 300.0

T = TypeVar("T")


class GcBusy(CastoreError):
    """Another gc is running on this repository."""


class GcRefused(FormatError):
    """gc will not sweep: a manifest it cannot read may name chunks it would remove."""


# -- the writer's side ------------------------------------------------------------------------------------
def needs_refresh(info: ObjectInfo, refresh_age: float = REFRESH_AGE, now: float | None = None) -> bool:
    """Whether a writer that found this existing chunk object must re-upload it before naming it in a manifest.

    An object whose time the backend does not report is never refreshed: gc never removes such an object either.
    """
    if info.modified is None:
        return False
    return (time.time() if now is None else now) - info.modified > refresh_age


def publish_in_time(upload_chunks: Callable[[], T], refresh_age: float = REFRESH_AGE, attempts: int = 3) -> T:
    """Run the chunk checks and uploads until one pass ends within half the refresh age of its start.

    A writer MUST publish within R of checking a chunk it did not refresh (FORMAT.md 5); half leaves the rest
    for the manifest's own PUT. A later pass re-checks every chunk (HEADs, and uploads of what went missing).
    """
    for _ in range(attempts):
        started = time.monotonic()
        result = upload_chunks()
        if time.monotonic() - started <= refresh_age / 2:
            return result
        log.info("castore: chunk uploads took longer than half the refresh age; checking the chunks again")
    raise BackendError(f"chunk uploads took longer than {refresh_age / 2:.0f} s {attempts} times; entry not published")


def recheck_refreshed(backend: Backend, refreshed: dict[str, bytes], delay: float = DELETE_WINDOW) -> int:
    """After publishing: wait out gc's delete window, then re-upload every refreshed chunk a gc removed meanwhile.

    A gc that read a chunk's old time just before this writer refreshed it may still delete it; its DELETE is
    answered within ``delay`` of its HEAD, so a HEAD sent ``delay`` after the refresh sees that deletion.
    Returns how many chunks were uploaded again.
    """
    time.sleep(delay)
    restored = 0
    for path, obj in refreshed.items():
        if backend.head(path) is None:
            backend.put(path, obj)
            restored += 1
            log.warning("castore: chunk %s was removed by a concurrent gc after its refresh; uploaded again", path)
    return restored


# -- what the bucket holds ---------------------------------------------------------------------------------
@dataclass
class ManifestRecord:
    path: str
    namespace: str
    key: str
    size: int  # of the manifest object
    modified: float | None
    manifest: Manifest | None  # None: unreadable (see problem)
    problem: str = ""


@dataclass
class BucketUsage:
    """What a listing of the bucket shows, split by whether a readable manifest names each chunk object."""

    manifests: int = 0
    manifest_bytes: int = 0
    bundles: int = 0
    unreadable_manifests: int = 0
    chunk_objects: int = 0
    chunk_bytes: int = 0
    referenced_objects: int = 0
    referenced_bytes: int = 0
    garbage_objects: int = 0  # chunk objects no manifest names
    garbage_bytes: int = 0
    missing_chunks: int = 0  # named by a manifest, absent from the bucket
    other_objects: int = 0  # anything else under the castore root
    other_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.manifest_bytes + self.chunk_bytes + self.other_bytes

    def to_dict(self) -> dict[str, int]:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["total_bytes"] = self.total_bytes
        return out


def _bucket(store: Store) -> Backend:
    """The backend behind the node-local layer: gc and du must see the bucket, not this node's copies."""
    from castore.local_layer import LocalLayer

    backend = store.backend
    return backend.inner if isinstance(backend, LocalLayer) else backend


def read_manifests(store: Store, namespace: str | None = None, *, limit: int | None = None) -> list[ManifestRecord]:
    """Every manifest object (of one namespace, or all), read from the bucket in parallel and parsed; with limit,
    only that many of the most recently modified."""
    bucket = _bucket(store)
    prefix = keys.manifest_prefix(namespace) if namespace else keys.ROOT + "/manifests/"
    root = len(keys.ROOT + "/manifests/")
    listed = [(path, info) for path, info in bucket.scan(prefix) if "/" in path[root:]]
    if limit is not None and len(listed) > limit:
        listed = sorted(listed, key=lambda item: item[1].modified or 0.0, reverse=True)[:limit]

    def read(item: tuple[str, ObjectInfo]) -> ManifestRecord | None:
        path, info = item
        ns, _, key = path[root:].partition("/")
        record = ManifestRecord(path, ns, key, info.size, info.modified, None)
        raw = bucket.get(path)
        if raw is None:
            return None  # removed since the listing
        try:
            record.manifest = Manifest.from_bytes(raw, max_size=store.max_blob_size)
        except UnsupportedFormatVersion:
            raise
        except FormatError as exc:
            record.problem = str(exc)
        return record

    with ThreadPoolExecutor(max_workers=min(16, bucket.max_concurrency), thread_name_prefix="castore-gc") as pool:
        return [r for r in pool.map(read, listed) if r is not None]


def bucket_usage(store: Store) -> BucketUsage:
    """Count what the bucket really holds: manifests, and chunk objects referenced or not (garbage)."""
    usage = BucketUsage()
    records = read_manifests(store)
    referenced: set[bytes] = set()
    for r in records:
        usage.manifests += 1
        usage.manifest_bytes += r.size
        if r.manifest is None:
            usage.unreadable_manifests += 1
            continue
        usage.bundles += r.manifest.kind == "bundle"
        referenced.update(ref.digest for ref in r.manifest.chunks)
    present: set[bytes] = set()
    for path, info in _bucket(store).scan(keys.ROOT + "/"):
        if path.startswith(keys.ROOT + "/manifests/"):
            continue
        digest = keys.parse_chunk_path(path)
        if digest is None:
            usage.other_objects += 1
            usage.other_bytes += info.size
            continue
        present.add(digest)
        usage.chunk_objects += 1
        usage.chunk_bytes += info.size
        if digest in referenced:
            usage.referenced_objects += 1
            usage.referenced_bytes += info.size
        else:
            usage.garbage_objects += 1
            usage.garbage_bytes += info.size
    usage.missing_chunks = len(referenced - present)
    return usage


def delete_namespace(store: Store, namespace: str) -> int:
    """Remove every key of a namespace (manifests only; chunks stay until gc). Returns how many were removed."""
    if store.read_only:
        raise ReadOnlyError(f"store {store.url} is read-only")
    paths = [path for path, _ in store.backend.list(keys.manifest_prefix(namespace))]
    with ThreadPoolExecutor(max_workers=min(16, store.backend.max_concurrency), thread_name_prefix="castore-rm") as pool:
        list(pool.map(store.backend.delete, paths))
    return len(paths)


# -- gc ---------------------------------------------------------------------------------------------------
@dataclass
class GcReport:
    dry_run: bool
    grace: float
    keep_age: float | None
    manifests: int = 0
    bundles: int = 0
    manifests_expired: list[str] = field(default_factory=list)  # "namespace/key"
    manifest_bytes_freed: int = 0
    unreadable_manifests: list[str] = field(default_factory=list)
    chunk_objects: int = 0
    referenced_chunks: int = 0
    young_garbage_chunks: int = 0  # unreferenced, within the grace period: kept
    chunks_removed: list[str] = field(default_factory=list)  # digests (hex)
    chunk_bytes_freed: int = 0
    chunks_kept_on_recheck: int = 0  # refreshed (or re-created) by a writer since the listing
    late_deletes: int = 0  # DELETEs answered later than the delete window
    lost_chunks: list[str] = field(default_factory=list)  # late deletes a manifest published meanwhile names
    stopped_early: str = ""

    @property
    def bytes_freed(self) -> int:
        return self.manifest_bytes_freed + self.chunk_bytes_freed

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["bytes_freed"] = self.bytes_freed
        return out


def sweep_deadline(grace: float, refresh_age: float = REFRESH_AGE, clock_skew: float = CLOCK_SKEW) -> float:
    """How long after its mark began gc may still delete: G - 2R - resolution - skew (FORMAT.md 5)."""
    return grace - 2 * refresh_age - MTIME_RESOLUTION - clock_skew


def collect(
    store: Store,
    *,
    grace: float = DEFAULT_GRACE,
    keep_age: float | None = None,
    dry_run: bool = False,
    refresh_age: float = REFRESH_AGE,
    delete_window: float = DELETE_WINDOW,
    clock_skew: float = CLOCK_SKEW,
    clock: Callable[[], float] = time.time,
    ignore_unreadable: bool = False,
) -> GcReport:
    """Mark every manifest kept (and the entries bundles name), then sweep the chunk objects none of them names
    that are older than ``grace`` seconds. With ``keep_age``, manifests older than that (by modification time)
    and named by no bundle are removed first. ``dry_run`` changes nothing and reports what would go. A manifest
    that cannot be read stops gc (GcRefused) unless ``ignore_unreadable``.
    """
    deadline = sweep_deadline(grace, refresh_age, clock_skew)
    if deadline <= 0:
        raise ConfigError(
            f"grace period {grace / 3600:.2f} h is too short: it must exceed twice the writers' refresh age "
            f"({refresh_age / 3600:.2f} h) plus {(MTIME_RESOLUTION + clock_skew) / 60:.0f} min for clocks"
        )
    if not dry_run and store.read_only:
        raise ReadOnlyError(f"store {store.url} is read-only")
    bucket = _bucket(store)
    report = GcReport(dry_run=dry_run, grace=grace, keep_age=keep_age)
    if dry_run:
        return _collect(store, bucket, report, deadline, grace, keep_age, True, delete_window, clock, ignore_unreadable)
    _take_lock(bucket, deadline, clock)
    try:
        return _collect(store, bucket, report, deadline, grace, keep_age, False, delete_window, clock, ignore_unreadable)
    finally:
        bucket.delete(LOCK_PATH)


LOCK_PATH = keys.ROOT + "/locks/gc"


def _take_lock(bucket: Backend, deadline: float, clock: Callable[[], float]) -> bytes:
    """One gc at a time (two could delete a chunk that a writer re-uploaded between their HEADs). A lock older
    than the longest sweep is left over from a gc that died: it is taken over."""
    import os as _os

    token = f"{_os.uname().nodename} {_os.getpid()} {clock():.0f}".encode()
    if bucket.put(LOCK_PATH, token, if_absent=True):
        return token
    info = bucket.head(LOCK_PATH)
    if info is not None and (info.modified is None or clock() - info.modified <= deadline + 60):
        holder = (bucket.get(LOCK_PATH) or b"?").decode(errors="replace")
        raise GcBusy(f"another gc holds {LOCK_PATH} ({holder}); try again later")
    bucket.delete(LOCK_PATH)
    if not bucket.put(LOCK_PATH, token, if_absent=True) or bucket.get(LOCK_PATH) != token:
        raise GcBusy(f"another gc took {LOCK_PATH} at the same time; try again later")
    return token


def _collect(store: Store, bucket: Backend, report: GcReport, deadline: float, grace: float, keep_age: float | None,
             dry_run: bool, delete_window: float, clock: Callable[[], float], ignore_unreadable: bool) -> GcReport:
    mark_started = time.monotonic()
    now = clock()

    # Mark. A manifest this reader cannot parse because it is from a newer format names chunks we cannot see:
    # read_manifests raises for it, and gc stops before deleting anything.
    try:
        records = read_manifests(store)
    except UnsupportedFormatVersion as exc:
        raise FormatError(f"a manifest has a newer format ({exc}); gc does not sweep what it cannot read") from exc
    bundle_refs: set[tuple[str, str]] = set()
    for r in records:
        if r.manifest is not None and r.manifest.kind == "bundle":
            report.bundles += 1
            bundle_refs.update(r.manifest.refs)
    report.manifests = len(records)
    kept: list[ManifestRecord] = []
    expired: list[ManifestRecord] = []
    for r in records:
        if r.manifest is None:
            report.unreadable_manifests.append(f"{r.namespace}/{r.key}: {r.problem}")
            continue
        old = keep_age is not None and r.modified is not None and now - r.modified > keep_age
        if old and r.manifest.kind != "bundle" and (r.namespace, r.key) not in bundle_refs:
            expired.append(r)
        else:
            kept.append(r)
    marked = {ref.digest for r in kept for ref in r.manifest.chunks}  # type: ignore[union-attr]
    if report.unreadable_manifests and not ignore_unreadable:
        # A manifest gc cannot read names chunks gc cannot see (damaged, or written by a reader gc does not know).
        why = (f"{len(report.unreadable_manifests)} manifests cannot be read (first: {report.unreadable_manifests[0]}); "
               "remove them with `castore rm NS KEY`, or pass --ignore-unreadable to sweep their chunks too")
        if not dry_run:
            raise GcRefused(why)
        report.stopped_early = "gc would refuse: " + why

    lock = threading.Lock()

    def expire(r: ManifestRecord) -> None:
        if not dry_run:
            info = bucket.head(r.path)  # rewritten since we read it (put --force): a new entry, keep it
            if info is None or (info.modified is not None and now - info.modified <= keep_age):  # type: ignore[operator]
                with lock:
                    marked.update(ref.digest for ref in r.manifest.chunks)  # type: ignore[union-attr]
                return
            store.backend.delete(r.path)
        with lock:
            report.manifests_expired.append(f"{r.namespace}/{r.key}")
            report.manifest_bytes_freed += r.size

    with ThreadPoolExecutor(max_workers=min(16, bucket.max_concurrency), thread_name_prefix="castore-gc") as pool:
        list(pool.map(expire, expired))
    report.manifests_expired.sort()

    # Sweep: candidates from the listing, each re-checked with a HEAD right before its DELETE.
    candidates: list[tuple[str, int]] = []
    for path, info in bucket.scan(keys.ROOT + "/chunks/"):
        digest = keys.parse_chunk_path(path)
        if digest is None:
            continue
        report.chunk_objects += 1
        if digest in marked:
            report.referenced_chunks += 1
        elif info.modified is None or now - info.modified <= grace:
            report.young_garbage_chunks += 1
        else:
            candidates.append((path, info.size))
    if dry_run:
        report.chunks_removed = [keys.parse_chunk_path(p).hex() for p, _ in candidates]  # type: ignore[union-attr]
        report.chunk_bytes_freed = sum(size for _, size in candidates)
        return report

    late: list[str] = []
    stop = threading.Event()

    def remove(item: tuple[str, int]) -> None:
        path, size = item
        if stop.is_set():
            return
        sent = time.monotonic()
        info = bucket.head(path)
        if time.monotonic() - mark_started > deadline:  # this HEAD came too late to trust the mark
            stop.set()
            return
        if info is None:
            return
        if info.modified is None or clock() - info.modified <= grace:
            with lock:
                report.chunks_kept_on_recheck += 1
            return
        store.backend.delete(path)  # through the local layer, so this node's copy goes too
        answered = time.monotonic()
        with lock:
            report.chunks_removed.append(path.rsplit("/", 1)[-1])
            report.chunk_bytes_freed += size
            if answered - sent > delete_window:
                late.append(path)

    with ThreadPoolExecutor(max_workers=min(16, bucket.max_concurrency), thread_name_prefix="castore-gc") as pool:
        list(pool.map(remove, candidates))
    if stop.is_set():
        report.stopped_early = (
            f"stopped sweeping {deadline:.0f} s after the mark began (the grace period allows no longer); "
            "run gc again to remove the rest"
        )
    report.late_deletes = len(late)
    if late:
        report.lost_chunks = _late_deletes_now_named(store, late, {r.path: r.modified for r in records}, delete_window)
    return report


def _late_deletes_now_named(store: Store, late: Iterable[str], marked: dict[str, float | None], delete_window: float) -> list[str]:
    """Late deletes that a manifest published (or rewritten) since the mark names: the writer's re-check may have
    missed them."""
    late_digests = {keys.parse_chunk_path(p) for p in late}
    named = set()
    for r in read_manifests(store):
        if r.manifest is None or (r.path in marked and r.modified == marked[r.path]):
            continue
        named.update(ref.digest for ref in r.manifest.chunks if ref.digest in late_digests)
    time.sleep(delete_window)  # the writers' re-checks, which re-upload what they find missing
    bucket = _bucket(store)
    lost = {d.hex() for d in named if bucket.head(keys.chunk_path(d)) is None}
    for digest in sorted(lost):
        log.error("castore: gc deleted chunk %s late and a new manifest names it: re-put that entry", digest)
    return sorted(lost)


__all__ = [
    "CLOCK_SKEW",
    "DEFAULT_GRACE",
    "DELETE_WINDOW",
    "REFRESH_AGE",
    "BucketUsage",
    "GcReport",
    "bucket_usage",
    "collect",
    "delete_namespace",
    "needs_refresh",
    "publish_in_time",
    "read_manifests",
    "recheck_refreshed",
    "sweep_deadline",
]
