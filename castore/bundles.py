"""Bundles: a named, versioned list of the entries a workload needs, packed for fleets (docs/FORMAT.md, 'Bundles').

A bundle ``NAME`` is published as versions ``bundles/NAME.1``, ``NAME.2``, ...; ``NAME`` resolves to the newest,
``NAME@N`` names one. Its manifest (kind ``bundle``) lists the closure as ``refs`` and the environment it was
built in as ``env.*`` metadata; its blob is the index of the packs that hold every manifest and chunk object of
the closure, so that a node reads the whole bundle with a few ranged GETs. Every object read from a pack is
verified: a chunk by its digest, a manifest by the SHA-256 the (verified) index records and by the manifest
parser. Packs are an optimisation: an object whose pack is missing or damaged is read from its own path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from castore.backends.base import Backend
from castore.errors import BackendError, CastoreError, FormatError
from castore.format import codec as codecs
from castore.format import keys
from castore.format.manifest import Manifest
from castore.format.pack import (
    BUNDLE_NAMESPACE,
    BundleIndex,
    ChunkItem,
    Location,
    ManifestItem,
    PackBuilder,
    PackError,
    bundle_key,
    pack_path,
    parse_bundle_ref,
    version_of,
)
from castore.store import Store

log = logging.getLogger(__name__)

PACK_TARGET_BYTES = 256 << 20  # a pack is closed once it holds this much (one PUT each)
READ_GAP_BYTES = 1 << 20  # objects closer than this in a pack are read with one ranged GET
READ_PART_BYTES = 64 << 20  # and no ranged GET reads more than this (parallel parts for large bundles)
ENV_PREFIX = "env."
Entry = tuple[str, str]  # (namespace, key)
# A fleet starting at once can exceed what one S3 partition serves (docs/SCALE.md). Fetching a bundle is not on a
# compile's critical path (`castore pull`, an init container; a prefetch that lookups wait for a bounded time):
# a throttled or failing read is retried for this many rounds of the backend's own retries, with full-jitter
# backoff of PATIENT_BASE seconds doubling up to PATIENT_CAP, i.e. for about a minute.
PATIENT_ROUNDS = 6
PATIENT_BASE = 1.0
PATIENT_CAP = 20.0
_RETRY_STATUS = (429, 500, 502, 503, 504)


def _worth_retrying(exc: BaseException) -> bool:
    """Throttling and server errors, not a refusal nor an unreachable endpoint (which waiting does not cure)."""
    return getattr(exc, "status", None) in _RETRY_STATUS or str(getattr(exc, "code", "")) in ("SlowDown", "503")


def patiently(fn: Callable[[], object], *, rounds: int = PATIENT_ROUNDS,
              sleep: Callable[[float], None] = time.sleep) -> object:  # fmt: skip
    """fn(), retried after throttling or server errors for ``rounds`` rounds with full-jitter backoff."""
    for attempt in range(1, rounds + 1):
        try:
            return fn()
        except BackendError as exc:
            if attempt == rounds or not _worth_retrying(exc):
                raise
            delay = min(PATIENT_CAP, random.random() * PATIENT_BASE * 2 ** (attempt - 1))
            log.info("castore: %s; retrying in %.1f s", exc, delay)
            sleep(delay)
    raise AssertionError("unreachable")


class BundleNotFound(CastoreError):
    """No bundle of that name (or version) is published."""


@dataclass
class Bundle:
    name: str
    version: int
    manifest: Manifest
    index: BundleIndex

    @property
    def key(self) -> str:
        return bundle_key(self.name, self.version)

    @property
    def entries(self) -> list[Entry]:
        return list(self.manifest.refs)

    @property
    def fingerprint(self) -> dict[str, str]:
        return {k[len(ENV_PREFIX) :]: str(v) for k, v in self.manifest.meta.items() if k.startswith(ENV_PREFIX)}

    @property
    def stored_bytes(self) -> int:
        return sum(m.where.length for m in self.index.manifests) + sum(c.where.length for c in self.index.chunks)


@dataclass
class PublishResult:
    bundle: Bundle
    published: bool  # False: the newest version already held exactly this closure and environment
    packs_written: int = 0
    bytes_packed: int = 0
    objects_reused: int = 0


@dataclass
class FetchReport:
    objects: int = 0  # objects written to the sink
    skipped: int = 0  # objects the sink already held
    bytes: int = 0
    ranged_reads: int = 0
    fallback_reads: int = 0  # objects read from their own path (pack missing or damaged)
    bad: list[str] = field(default_factory=list)


# -- naming and reading ----------------------------------------------------------------------------------
def versions(store: Store, name: str) -> list[int]:
    """Published versions of a bundle, oldest first (one LIST request)."""
    prefix = keys.manifest_prefix(BUNDLE_NAMESPACE) + name + "."
    listed: list[tuple[str, int]] = patiently(lambda: list(store.backend.list(prefix)))  # type: ignore[assignment]
    found = (version_of(name, path.rsplit("/", 1)[-1]) for path, _ in listed)
    return sorted(v for v in found if v is not None)


def open_bundle(store: Store, ref: str) -> Bundle:
    """The bundle 'NAME' (newest version) or 'NAME@N', verified (its manifest by the store, its index by digest)."""
    name, version = parse_bundle_ref(ref)
    if version is None:
        found = versions(store, name)
        if not found:
            raise BundleNotFound(f"no bundle named {name!r} in {store.url}")
        version = found[-1]
    key = bundle_key(name, version)
    manifest: Manifest | None = patiently(lambda: store.stat(BUNDLE_NAMESPACE, key))  # type: ignore[assignment]
    if manifest is None:
        raise BundleNotFound(f"no bundle {name}@{version} in {store.url}")
    if manifest.kind != "bundle":
        raise FormatError(f"{BUNDLE_NAMESPACE}/{key} is a {manifest.kind}, not a bundle")
    raw: bytes | None = patiently(lambda: store.read_blob(manifest))  # type: ignore[assignment]
    if raw is None:
        raise FormatError(f"the index of bundle {name}@{version} is missing or corrupt")
    return Bundle(name, version, manifest, BundleIndex.from_bytes(raw))


def missing_entries(store: Store, entries: Iterable[Entry]) -> list[Entry]:
    """The entries whose manifest the store does not hold: one HEAD each, in parallel (a namespace shared by a
    whole organisation can hold millions of keys; a closure holds hundreds)."""
    wanted = list(dict.fromkeys(entries))
    reader = _ObjectReader(store)
    try:
        held = reader.map(lambda e: store.backend.exists(keys.manifest_path(*e)), wanted)
    finally:
        reader.close()
    return [e for e, present in zip(wanted, held) if not present]


# -- publishing ------------------------------------------------------------------------------------------
def publish(store: Store, name: str, entries: Iterable[Entry], fingerprint: dict[str, str], *,
            meta: dict[str, object] | None = None) -> PublishResult:  # fmt: skip
    """Publish the next version of bundle NAME over these entries, packing only objects that no pack of an
    earlier version holds. Raises FormatError (an entry missing or corrupt) and BackendError."""
    bundle_key(name, 1)  # validate the name before any work
    closure = sorted(dict.fromkeys(entries))
    found = versions(store, name)
    previous = open_bundle(store, f"{name}@{found[-1]}") if found else None
    reader = _ObjectReader(store)
    try:
        return _publish(store, name, closure, fingerprint, meta, found, previous, reader)
    finally:
        reader.close()


def _publish(store: Store, name: str, closure: list[Entry], fingerprint: dict[str, str], meta: dict[str, object] | None,
             found: list[int], previous: Bundle | None, reader: _ObjectReader) -> PublishResult:  # fmt: skip
    raws = reader.map(lambda e: (e, store.backend.get(keys.manifest_path(*e))), closure)
    manifests: list[tuple[Entry, bytes, Manifest]] = []
    for entry, raw in raws:
        if raw is None:
            raise FormatError(f"entry {entry[0]}/{entry[1]} is not in the store")
        m = Manifest.from_bytes(raw, max_size=store.max_blob_size)
        if (m.namespace, m.key) != entry:
            raise FormatError(f"manifest at {entry[0]}/{entry[1]} describes {m.namespace}/{m.key}")
        manifests.append((entry, raw, m))

    old_manifests: dict[tuple[str, str, bytes], ManifestItem] = {}
    old_chunks: dict[bytes, ChunkItem] = {}
    if previous is not None:
        # Objects in the earlier version's packs are not packed again, provided those packs are still there.
        packs = previous.index.packs
        present = reader.map(lambda p: store.backend.exists(pack_path(p[0])), packs)
        live = {i for i, ok in enumerate(present) if ok}
        old_manifests = {(i.namespace, i.key, i.sha256): i for i in previous.index.manifests if i.where.pack in live}
        old_chunks = {c.digest: c for c in previous.index.chunks if c.where.pack in live}
        same_env = previous.fingerprint == {k: str(v) for k, v in fingerprint.items()}
        if same_env and previous.entries == closure and all(
            (e[0], e[1], hashlib.sha256(raw).digest()) in old_manifests for e, raw, _ in manifests
        ):
            return PublishResult(previous, published=False)

    index = BundleIndex()
    pack_numbers: dict[bytes, int] = {}  # pack digest -> its number in the new index

    def reuse(where: Location) -> Location:
        assert previous is not None
        digest, size = previous.index.packs[where.pack]
        if digest not in pack_numbers:
            pack_numbers[digest] = len(index.packs)
            index.packs.append((digest, size))
        return Location(pack_numbers[digest], where.offset, where.length)

    result = PublishResult(bundle=None, published=True)  # type: ignore[arg-type]
    builder = PackBuilder()
    # Objects in the pack being built, waiting for its number: (("m", namespace, key, sha) or ("c", digest, size),
    # offset, length).
    pending: list[tuple[tuple, int, int]] = []

    def flush_pack() -> None:
        nonlocal builder, pending
        if builder.empty:
            return
        digest, data = builder.finish()
        store.backend.put(pack_path(digest), data, if_absent=True)
        number = len(index.packs)
        index.packs.append((digest, len(data)))
        for item, offset, length in pending:
            where = Location(number, offset, length)
            if item[0] == "m":
                index.manifests.append(ManifestItem(item[1], item[2], item[3], where))
            else:
                index.chunks.append(ChunkItem(item[1], item[2], where))
        result.packs_written += 1
        result.bytes_packed += len(data)
        builder, pending = PackBuilder(), []

    def add(item: tuple, obj: bytes) -> None:
        if len(builder) + len(obj) > PACK_TARGET_BYTES and not builder.empty:
            flush_pack()
        offset, length = builder.add(obj)
        pending.append((item, offset, length))

    for (ns, key), raw, _ in manifests:
        sha = hashlib.sha256(raw).digest()
        old = old_manifests.get((ns, key, sha))
        if old is not None:
            index.manifests.append(ManifestItem(ns, key, sha, reuse(old.where)))
            result.objects_reused += 1
        else:
            add(("m", ns, key, sha), raw)
    refs = {r.digest: r for _, _, m in manifests if m.inline is None for r in m.chunks}
    new_refs = []
    for digest, ref in refs.items():
        old_chunk = old_chunks.get(digest)
        if old_chunk is not None and old_chunk.size == ref.size:
            index.chunks.append(ChunkItem(digest, ref.size, reuse(old_chunk.where)))
            result.objects_reused += 1
        else:
            new_refs.append(ref)

    def read_chunk(ref):  # noqa: ANN001, ANN202
        obj = store.backend.get(keys.chunk_path(ref.digest))
        if obj is None:
            raise FormatError(f"chunk {ref.digest.hex()} is not in the store")
        codecs.decode_chunk(obj, ref.digest, ref.size)  # never pack a damaged chunk
        return ref, obj

    # Read in bounded batches: a pack is built in memory, its chunks need not all be.
    for start in range(0, len(new_refs), 256):
        for ref, obj in reader.map(read_chunk, new_refs[start : start + 256]):
            add(("c", ref.digest, ref.size), obj)
    flush_pack()

    version = (found[-1] if found else 0) + 1
    bundle_meta: dict[str, object] = {"bundle": name, "version": version, "entries": len(closure), **(meta or {})}
    bundle_meta.update({ENV_PREFIX + k: str(v) for k, v in fingerprint.items()})
    blob = index.to_bytes()
    while True:  # another publisher may take a version number first: take the next one
        put = store.put_bundle(BUNDLE_NAMESPACE, bundle_key(name, version), blob, refs=closure, meta=bundle_meta)
        if put.published:
            break
        version += 1
        bundle_meta["version"] = version
    result.bundle = Bundle(name, version, put.manifest, index)
    return result


# -- fetching --------------------------------------------------------------------------------------------
@dataclass
class _Wanted:
    path: str
    where: Location
    check: Callable[[bytes], None]  # raises FormatError for bytes that are not this object


def fetch(
    store: Store,
    bundle: Bundle,
    sink: Callable[[str, bytes], None],
    *,
    have: Callable[[str], bool] = lambda path: False,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> FetchReport:
    """Hand every object of the bundle's closure, verified, to sink(path, bytes): manifests and chunks read from
    the packs with ranged GETs (neighbours coalesced), objects whose pack fails read from their own paths."""
    report = FetchReport()
    wanted: list[_Wanted] = []
    for m in bundle.index.manifests:
        wanted.append(_Wanted(m.path, m.where, _manifest_check(store, m)))
    for c in bundle.index.chunks:
        wanted.append(_Wanted(c.path, c.where, _chunk_check(c)))
    todo = []
    for w in wanted:
        if have(w.path):
            report.skipped += 1
        else:
            todo.append(w)
    runs = plan_reads(todo)
    pool = ThreadPoolExecutor(max_workers=workers or store.backend.max_concurrency, thread_name_prefix="castore-pull")
    try:
        for outcome in pool.map(lambda run: _read_run(store, bundle, run, sink, progress), runs):
            report.ranged_reads += 1
            report.objects += outcome.objects
            report.bytes += outcome.bytes
            report.fallback_reads += outcome.fallback_reads
            report.bad += outcome.bad
    finally:
        pool.shutdown(wait=True)
    return report


def plan_reads(todo: list[_Wanted]) -> list[list[_Wanted]]:
    """Group objects into runs, one ranged GET each: same pack, gaps under READ_GAP_BYTES, at most READ_PART_BYTES."""
    runs: list[list[_Wanted]] = []
    ends: list[int] = []
    for w in sorted(todo, key=lambda w: (w.where.pack, w.where.offset)):
        end = w.where.offset + w.where.length
        if runs:
            first = runs[-1][0].where
            near = w.where.offset - ends[-1] <= READ_GAP_BYTES and end - first.offset <= READ_PART_BYTES
            if w.where.pack == first.pack and near:
                runs[-1].append(w)
                ends[-1] = max(ends[-1], end)
                continue
        runs.append([w])
        ends.append(end)
    return runs


def _read_run(store: Store, bundle: Bundle, run: list[_Wanted], sink: Callable[[str, bytes], None],
              progress: Callable[[int], None] | None) -> FetchReport:  # fmt: skip
    out = FetchReport()
    start = run[0].where.offset
    end = max(w.where.offset + w.where.length for w in run)
    path = bundle.index.pack_path(run[0].where.pack)
    try:
        data: bytes | None = patiently(lambda: store.backend.get_range(path, start, end))  # type: ignore[assignment]
    except CastoreError as exc:
        log.info("castore: reading pack %s failed (%s); reading its objects one by one", path, exc)
        data = None
    if data is not None and len(data) != end - start:
        log.warning("castore: pack %s is shorter than its bundle says; reading its objects one by one", path)
        data = None
    for w in run:
        obj = data[w.where.offset - start : w.where.offset - start + w.where.length] if data is not None else None
        if obj is not None:
            try:
                w.check(obj)
            except FormatError as exc:
                log.warning("castore: %s in pack %s failed verification (%s); reading it from its own path",
                            w.path, path, exc)  # fmt: skip
                obj = None
        if obj is None:
            out.fallback_reads += 1
            try:
                obj = patiently(lambda: store.backend.get(w.path))  # type: ignore[assignment]
                if obj is None:
                    raise FormatError("missing")
                w.check(obj)
            except CastoreError as exc:
                out.bad.append(f"{w.path}: {exc}")
                continue
        sink(w.path, obj)
        out.objects += 1
        out.bytes += len(obj)
        if progress:
            progress(len(obj))
    return out


def _chunk_check(item: ChunkItem) -> Callable[[bytes], None]:
    def check(obj: bytes) -> None:
        codecs.decode_chunk(obj, item.digest, item.size)

    return check


def _manifest_check(store: Store, item: ManifestItem) -> Callable[[bytes], None]:
    def check(obj: bytes) -> None:
        if hashlib.sha256(obj).digest() != item.sha256:
            raise PackError(f"manifest {item.namespace}/{item.key} does not match the bundle's digest of it")
        m = Manifest.from_bytes(obj, max_size=store.max_blob_size)
        if (m.namespace, m.key) != (item.namespace, item.key):
            raise PackError(f"manifest at {item.namespace}/{item.key} describes {m.namespace}/{m.key}")

    return check


class _ObjectReader:
    def __init__(self, store: Store) -> None:
        self._pool = ThreadPoolExecutor(max_workers=store.backend.max_concurrency, thread_name_prefix="castore-pack")

    def map(self, fn, items):  # noqa: ANN001, ANN201
        return list(self._pool.map(fn, items))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


# -- into a directory, into the local layer --------------------------------------------------------------
def pull(store: Store, bundle: Bundle, dest: Backend, *, progress: Callable[[int], None] | None = None) -> FetchReport:
    """Copy a bundle's closure (open_bundle) into another backend (a file:// store), verified. Objects it holds
    already are kept."""
    return fetch(store, bundle, lambda path, obj: dest.put(path, obj), have=dest.exists, progress=progress)


PREFETCH_MARKER_TTL = 600.0  # seconds a node trusts that it prefetched a bundle's newest version


def prefetch_into_local(store: Store, ref: str) -> FetchReport | None:
    """Bring a bundle's closure into the store's local layer (CASTORE_BUNDLE). One process per node does the
    work (a lock file), and the node skips it for PREFETCH_MARKER_TTL seconds after. None without a local layer."""
    local = store.local
    if local is None:
        return None
    import fcntl

    directory = os.path.join(local.directory, "bundles")
    os.makedirs(directory, exist_ok=True)
    marker = os.path.join(directory, ref.replace("@", "-at-"))
    fd = os.open(marker + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if time.time() - os.path.getmtime(marker) < PREFETCH_MARKER_TTL:
                return FetchReport()
        except OSError:
            pass
        bundle = open_bundle(store, ref)
        report = fetch(store, bundle, local.admit, have=local.holds)
        if not report.bad:
            with open(marker, "w") as f:
                f.write(bundle.key + "\n")
        return report
    finally:
        os.close(fd)
