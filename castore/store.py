"""The store: keyed blobs, files and directory trees over any backend, chunked, deduplicated and verified."""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TypeVar

from castore import gc as gc_protocol
from castore.backends.base import Backend
from castore.errors import CorruptChunkError, FormatError, MovedEntryError, ReadOnlyError, UnsafeTreeError, UntrustedEntryError
from castore.format import chunking, keys
from castore.format import codec as codecs
from castore.format.manifest import INLINE_THRESHOLD, ChunkRef, Manifest, TreeEntry, decode_envelope, encode_envelope
from castore.format.tree import checked_entries, safe_mode, scan_tree
from castore.fsutil import current_umask
from castore.local_layer import LocalLayer
from castore.signing import SecretKey, TrustPolicy, Verdict, unchecked
from castore.version import __version__

log = logging.getLogger(__name__)

DEFAULT_MAX_BLOB_SIZE = 64 << 30
ProgressFn = Callable[[int], None]
_T = TypeVar("_T")
# One warning per bad chunk per process, naming the entry that needed it (others that share it miss silently).
BAD_CHUNK = "castore: chunk %s %s; %s (and any entry that shares it) is treated as a miss"
Sink = Callable[[bytes | memoryview], object]


@dataclass
class PutResult:
    manifest: Manifest
    published: bool  # False: another writer published this key first and its manifest stands
    chunks_total: int = 0
    chunks_uploaded: int = 0
    bytes_uploaded: int = 0
    # Existing chunk objects re-uploaded because they were old (gc protocol, FORMAT.md 5), path -> object.
    refreshed: dict[str, bytes] = field(default_factory=dict, repr=False)


@dataclass
class StoreStats:
    gets: int = 0
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    untrusted: int = 0  # manifest reads refused: unsigned, wrongly signed, revoked or moved entries
    puts: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    chunks_uploaded: int = 0
    chunks_deduplicated: int = 0


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


class Store:
    #: The gc protocol's writer side (FORMAT.md 5): reused chunk objects older than this are uploaded again, and
    #: chunks so refreshed are checked again this long after (tests shorten both).
    chunk_refresh_age: float = gc_protocol.REFRESH_AGE
    chunk_recheck_delay: float = gc_protocol.DELETE_WINDOW

    def __init__(
        self,
        backend: Backend,
        *,
        read_only: bool = False,
        max_blob_size: int = DEFAULT_MAX_BLOB_SIZE,
        workers: int | None = None,
        trust: TrustPolicy | None = None,
        signing_key: SecretKey | None = None,
    ) -> None:
        """``trust``: which manifests this reader accepts (None: any intact one); ``signing_key``: sign what this
        writer publishes (castore/signing.py)."""
        self.backend = backend
        self.trust = trust if trust is not None and trust.active else None
        self.signing_key = signing_key
        self._untrusted_logged: set[tuple[str, str]] = set()
        # A writer without the key in a store whose readers require signatures: what it publishes is refused.
        self._warn_unsigned = self.trust is not None and self.trust.require and signing_key is None
        self.read_only = read_only
        self.max_blob_size = max_blob_size
        self.local = backend if isinstance(backend, LocalLayer) else None
        self._workers = workers or backend.max_concurrency
        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="castore")
        self.stats = StoreStats()
        self._stats_lock = threading.Lock()
        # Objects (chunk and manifest paths) this process found corrupt or missing: later reads miss without a
        # request, and each is warned about once. A put of the same object by this process clears it.
        self._bad: set[str] = set()
        self._warned: set[str] = set()
        self._bad_lock = threading.Lock()
        if self.local is not None:
            self.local.admission_check = self._admission_check

    @property
    def url(self) -> str:
        return self.backend.url

    @property
    def _bucket(self) -> Backend:
        """The backend behind the local layer: what verification and repair look at."""
        return self.local.inner if self.local is not None else self.backend

    @property
    def bad_objects(self) -> frozenset[str]:
        """Object paths this process found corrupt or missing and no longer asks for."""
        with self._bad_lock:
            return frozenset(self._bad)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.backend.close()

    def cancel_queued(self) -> None:
        """Cancel the work queued on the store's threads and take no more (a process giving up at exit: nothing
        may wait on queued uploads). Requests already running finish; calls that need the threads then fail."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _bump(self, **counts: int) -> None:
        with self._stats_lock:
            for name, n in counts.items():
                setattr(self.stats, name, getattr(self.stats, name) + n)

    def stats_dict(self) -> dict[str, int]:
        out = asdict(self.stats)
        if self.local is not None:
            out.update({f"local_{k}": v for k, v in asdict(self.local.stats).items()})
        return out

    # -- writing ---------------------------------------------------------------------------------
    def put(
        self,
        namespace: str,
        key: str,
        data: bytes | bytearray | memoryview,
        *,
        meta: dict[str, object] | None = None,
        overwrite: bool = False,
        progress: ProgressFn | None = None,
    ) -> PutResult:
        """Store a blob under (namespace, key). Chunks go first; the manifest is published last, atomically.

        Without overwrite, a key that is already published keeps its manifest (first writer wins) and
        ``published`` is False.
        """
        view = memoryview(data).cast("B")
        return self._publish(namespace, key, overwrite,
                             lambda ow: self._put(namespace, key, view, kind="blob", meta=meta, overwrite=ow, progress=progress))

    def put_file(self, namespace: str, key: str, path: str | os.PathLike[str], **kw: object) -> PutResult:
        with open(path, "rb") as f:
            data = f.read()
        meta = dict(kw.pop("meta", None) or {})  # type: ignore[call-overload]
        meta.setdefault("filename", os.path.basename(path))
        meta.setdefault("mode", os.stat(path).st_mode & 0o7777)
        return self.put(namespace, key, data, meta=meta, **kw)  # type: ignore[arg-type]

    def put_tree(
        self,
        namespace: str,
        key: str,
        directory: str | os.PathLike[str],
        *,
        meta: dict[str, object] | None = None,
        overwrite: bool = False,
        progress: ProgressFn | None = None,
    ) -> PutResult:
        blob = bytearray()
        entries = []
        for entry in scan_tree(directory):
            if entry.type == "f":
                with open(os.path.join(directory, entry.path), "rb") as f:
                    content = f.read()
                entry = TreeEntry(entry.path, "f", entry.mode, len(content))  # the size we read, not the one we saw
                blob += content
            entries.append(entry)
        return self._publish(namespace, key, overwrite, lambda ow: self._put(
            namespace, key, memoryview(blob), kind="tree", files=entries, meta=meta, overwrite=ow, progress=progress))

    def _publish(self, namespace: str, key: str, overwrite: bool, put: Callable[[bool], PutResult]) -> PutResult:
        """Run a put; when first-writer-wins kept a published manifest that is unusable (torn, corrupt), replace it:
        a re-put heals the key."""
        result = put(overwrite)
        if not result.published and not overwrite and self._published_manifest_unusable(namespace, key):
            log.warning("castore: %s/%s: the published manifest is unusable; replacing it", namespace, key)
            result = put(True)
        self._forgive(keys.manifest_path(namespace, key))
        return result

    def _published_manifest_unusable(self, namespace: str, key: str) -> bool:
        """Whether the manifest that won the conditional create is one this store's readers would refuse: torn,
        corrupt, or (where readers check signatures) not trusted, as a manifest planted without the key is."""
        raw = self._bucket.get(keys.manifest_path(namespace, key))
        if raw is None:
            return True  # removed since the conditional create failed
        try:
            if self.trust is not None and not self.trust.check(decode_envelope(raw)).trusted:
                return True
            self._parse_manifest(raw, namespace, key)
        except FormatError:
            return True
        return False

    def _parse_manifest(self, raw: bytes, namespace: str, key: str) -> Manifest:
        manifest = Manifest.from_bytes(raw, max_size=self.max_blob_size)
        if (manifest.namespace, manifest.key) != (namespace, key):
            raise FormatError(f"manifest at {namespace}/{key} describes {manifest.namespace}/{manifest.key}")
        return manifest

    def put_bundle(
        self,
        namespace: str,
        key: str,
        data: bytes | bytearray | memoryview,
        *,
        refs: Iterable[tuple[str, str]],
        meta: dict[str, object] | None = None,
        overwrite: bool = False,
    ) -> PutResult:
        """Store a bundle (docs/FORMAT.md, 'Bundles and packs'): its index as the blob, the entries it names as refs."""
        return self._put(namespace, key, memoryview(data).cast("B"), kind="bundle", meta=meta, overwrite=overwrite,
                         progress=None, refs=list(refs))  # fmt: skip

    def _put(self, namespace, key, view, *, kind, meta, overwrite, progress, files=None, refs=None) -> PutResult:  # noqa: ANN001
        keys.validate_namespace(namespace)
        keys.validate_key(key)
        if self.read_only:
            raise ReadOnlyError(f"store {self.url} is read-only")
        manifest = Manifest(
            namespace=namespace,
            key=key,
            size=len(view),
            digest=hashlib.sha256(view).digest(),
            kind=kind,
            files=files or [],
            refs=refs or [],
            meta={"castore": __version__, **{k: _meta_value(v) for k, v in (meta or {}).items()}},
            writer=f"castore/{__version__}",
        )
        result = PutResult(manifest=manifest, published=False)
        if len(view) <= INLINE_THRESHOLD:
            manifest.inline = codecs.encode_chunk(view)[0]
        else:
            params = chunking.params_for_size(len(view))
            manifest.chunker = params
            pieces = list(chunking.cut(view, params))
            refs = gc_protocol.publish_in_time(
                lambda: list(self._pool.map(lambda piece: self._upload_chunk(piece, progress, result), pieces)),
                self.chunk_refresh_age,
            )
            manifest.chunks = refs
            result.chunks_total = len(refs)
        body = manifest.body_bytes()
        signatures = [self.signing_key.sign_body(body)] if self.signing_key is not None else []
        if self._warn_unsigned:
            self._warn_unsigned = False
            log.warning("castore: publishing unsigned entries (no signing_key) while signatures are required: "
                        "readers that require signatures, this one included, will refuse them")
        published = self.backend.put(keys.manifest_path(namespace, key), encode_envelope(body, signatures), if_absent=not overwrite)
        result.published = published
        if result.refreshed:  # published or not: writers that found the chunk young since rely on this refresh
            gc_protocol.recheck_refreshed(self.backend, result.refreshed, self.chunk_recheck_delay)
        self._bump(puts=1, bytes_written=result.bytes_uploaded, chunks_uploaded=result.chunks_uploaded,
                   chunks_deduplicated=result.chunks_total - result.chunks_uploaded)
        return result

    def _upload_chunk(self, piece: memoryview, progress: ProgressFn | None, result: PutResult) -> ChunkRef:
        digest = codecs.sha256(piece)
        path = keys.chunk_path(digest)
        obj, codec = codecs.encode_chunk(piece)
        ref = ChunkRef(digest, len(piece), len(obj), codec)
        upload, recheck = self._chunk_needs_upload(path, obj, ref)
        if upload:
            self.backend.put(path, obj)
            self._forgive(path)
            if recheck:  # over an object old enough for gc to have judged it by its age (gc.py)
                with self._stats_lock:
                    result.refreshed[path] = obj
            with self._stats_lock:
                result.chunks_uploaded += 1
                result.bytes_uploaded += len(obj)
        if progress:
            progress(len(piece))
        return ref

    def _chunk_needs_upload(self, path: str, obj: bytes, ref: ChunkRef) -> tuple[bool, bool]:
        """(upload it, recheck it after publishing). Upload when the bucket lacks a valid copy of this chunk, or
        holds one old enough that gc may be about to sweep it (gc.needs_refresh); an upload over such an old object
        is rechecked (gc.recheck_refreshed). A HEAD decides when the object is missing, or has our size and (where
        the backend reports one) our MD5; otherwise the object is read and verified, and a different but valid
        encoding of the chunk is kept (two writers never replace each other's copy)."""
        info = self.backend.head(path)
        stale = info is not None and gc_protocol.needs_refresh(info, self.chunk_refresh_age)
        with self._bad_lock:
            if path in self._bad:
                return True, stale  # this process found it corrupt or missing on read
        if info is None or stale:
            return True, stale
        if info.size == len(obj) and (info.md5 is None or info.md5 == hashlib.md5(obj, usedforsecurity=False).hexdigest()):
            return False, False
        existing = self._bucket.get(path)
        if existing is None:
            return True, False
        try:
            codecs.decode_chunk(existing, ref.digest, ref.size)
        except FormatError as exc:
            log.warning("castore: chunk %s in %s is corrupt (%s); uploading it again", ref.digest.hex(), self.url, exc)
            self._bump(corrupt=1)
            return True, False
        return False, False

    # -- reading ---------------------------------------------------------------------------------
    def stat(self, namespace: str, key: str) -> Manifest | None:
        """The key's manifest, or None. Raises FormatError for a manifest that cannot be trusted: damaged
        (ManifestError) or refused by this reader's trust policy (UntrustedEntryError, counted, logged once)."""
        found = self._load_manifest(namespace, key, enforce=True)
        return found[0] if found is not None else None

    def inspect(self, namespace: str, key: str) -> tuple[Manifest, Verdict, int] | None:
        """The key's manifest, this reader's verdict on it and its format version, without refusing an untrusted
        entry (for display: `castore stat`). Never use the result of an untrusted verdict to read data."""
        return self._load_manifest(namespace, key, enforce=False)

    def _load_manifest(self, namespace: str, key: str, *, enforce: bool) -> tuple[Manifest, Verdict, int] | None:
        path = keys.manifest_path(namespace, key)
        raw = self.backend.get(path)
        if raw is None:
            return None
        try:
            # Checksum and signatures first: the body is parsed only once this reader trusts its bytes.
            envelope = decode_envelope(raw)
            verdict = self.trust.check(envelope) if self.trust is not None else unchecked(envelope)
            if enforce and not verdict.trusted:
                self._refuse(namespace, key, verdict.reason)
            manifest = Manifest.from_envelope(envelope, max_size=self.max_blob_size)
        except UntrustedEntryError:
            raise
        except FormatError:
            if self.local is not None:
                self.local.forget(path)
            raise
        if (manifest.namespace, manifest.key) != (namespace, key):
            # A valid entry copied to another key: what it holds was made for another graph.
            reason = f"moved: the entry was written for {manifest.namespace}/{manifest.key}"
            verdict = Verdict(False, reason, verdict.verified_by, verdict.signers)
            if enforce:
                self._refuse(namespace, key, reason, MovedEntryError)
        return manifest, verdict, envelope.format

    def _refuse(self, namespace: str, key: str, reason: str, error: type[UntrustedEntryError] = UntrustedEntryError) -> None:
        """Count an untrusted entry, say so once per entry and process, drop any local copy, and raise."""
        self._bump(untrusted=1)
        with self._stats_lock:
            first = (namespace, key) not in self._untrusted_logged
            if first and len(self._untrusted_logged) < 100_000:
                self._untrusted_logged.add((namespace, key))
        (log.warning if first else log.debug)("castore: %s/%s: untrusted entry treated as a miss: %s", namespace, key, reason)
        if self.local is not None:
            self.local.forget(keys.manifest_path(namespace, key))
        raise error(f"{namespace}/{key}: untrusted entry: {reason}")

    def contains(self, namespace: str, key: str) -> bool:
        return self.backend.exists(keys.manifest_path(namespace, key))

    def get(self, namespace: str, key: str, *, progress: ProgressFn | None = None) -> bytes | None:
        """The blob's bytes, or None on a miss. A corrupt or incomplete entry is a miss plus a warning."""
        self._bump(gets=1)
        _, data = self._load(namespace, key, lambda m: self._read_blob(m, progress))
        self._bump(**({"hits": 1, "bytes_read": len(data)} if data is not None else {"misses": 1}))
        return data

    def get_many(self, namespace: str, keys_: Iterable[str]) -> dict[str, bytes | None]:
        """Fetch many keys at once: manifests in parallel, then every chunk of every key in parallel."""
        wanted = list(dict.fromkeys(keys_))
        manifests = dict(zip(wanted, self._pool.map(lambda k: self._stat_checked(namespace, k), wanted)))
        unique = {ref.digest: (ref, f"{namespace}/{k}") for k, m in manifests.items() if m is not None and m.inline is None
                  for ref in m.chunks}
        fetched = dict(zip(unique, self._pool.map(lambda job: self._fetch_chunk(job[0], True, job[1]), unique.values())))
        out: dict[str, bytes | None] = {}
        for k in wanted:
            m = manifests[k]
            data = None
            if m is not None:
                if m.inline is not None:
                    data = self._inline_data(m)
                else:
                    parts = [fetched[ref.digest] for ref in m.chunks]
                    if all(p is not None for p in parts):
                        data = b"".join(parts)  # type: ignore[arg-type]
                        if hashlib.sha256(data).digest() != m.digest:
                            data = None
                if data is None:  # the single-key path retries a local manifest once, then remembers the miss
                    _, data = self._load(namespace, k, self._read_blob)
            out[k] = data
            self._bump(gets=1, **({"hits": 1, "bytes_read": len(data)} if data is not None else {"misses": 1}))
        return out

    def prefetch(self, namespace: str, keys_: Iterable[str]) -> int:
        """Bring the objects of many keys into the local layer, in parallel: a later get reads them locally.
        What is fetched is verified before the layer admits it. Returns how many keys are now held; 0 without
        a local layer."""
        if self.local is None:
            return 0
        wanted = list(dict.fromkeys(keys_))
        manifests = [m for m in self._pool.map(lambda k: self._stat_checked(namespace, k), wanted) if m is not None]
        jobs = list({ref.digest: (ref, f"{namespace}/{m.key}") for m in manifests if m.inline is None for ref in m.chunks}.values())
        held = dict(zip((ref.digest for ref, _ in jobs), self._pool.map(lambda job: self._prefetch_chunk(*job), jobs)))
        return sum(1 for m in manifests if m.inline is not None or all(held[r.digest] for r in m.chunks))

    def get_file(self, namespace: str, key: str, dest: str | os.PathLike[str], *, progress: ProgressFn | None = None,
                 keep_mode: bool = True) -> bool:
        """Write the blob to dest atomically, streamed (never held whole in memory). False on a miss.

        With keep_mode the file gets the stored mode without setuid/setgid/sticky and group/world write bits;
        without it, the mode a new file gets (0o666 less the umask).
        """
        self._bump(gets=1)
        target = os.fspath(dest)
        _, written = self._load(namespace, key, lambda m: self._write_blob_file(m, target, progress, keep_mode))
        if written is None:
            self._bump(misses=1)
            return False
        self._bump(hits=1, bytes_read=written)
        return True

    def get_tree(self, namespace: str, key: str, dest: str | os.PathLike[str], *, progress: ProgressFn | None = None) -> bool:
        """Recreate a stored directory tree under dest (see extract_tree). False on a miss.

        Every entry is checked before anything is written; an unsafe entry raises UnsafeTreeError."""
        self._bump(gets=1)

        def read(m: Manifest) -> bytes | None:
            if m.kind != "tree":
                raise FormatError(f"{namespace}/{key} is a {m.kind}, not a tree")
            checked_entries(m.files)  # before any chunk is fetched
            return self._read_blob(m, progress)

        manifest, data = self._load(namespace, key, read)
        if manifest is None or data is None:
            self._bump(misses=1)
            return False
        extract_tree(manifest, data, dest)
        self._bump(hits=1, bytes_read=len(data))
        return True

    def read_blob(self, manifest: Manifest, progress: ProgressFn | None = None) -> bytes | None:
        """The verified blob of a manifest stat() returned, or None when a chunk is missing or corrupt."""
        return self._read_blob(manifest, progress)

    # -- verified reading: every object checked once, a local copy refetched once, bad objects remembered -------
    def _warn_once(self, path: str, message: str, *args: object) -> None:
        with self._bad_lock:
            if path in self._warned:
                return
            self._warned.add(path)
        log.warning(message, *args)

    def _mark_bad(self, path: str, *, corrupt: bool, message: str | None = None, args: tuple[object, ...] = ()) -> None:
        with self._bad_lock:
            new = path not in self._bad
            self._bad.add(path)
        if new and corrupt:
            self._bump(corrupt=1)
        if message is not None:
            self._warn_once(path, message, *args)

    def _is_bad(self, path: str) -> bool:
        with self._bad_lock:
            return path in self._bad

    def _forgive(self, path: str) -> None:
        """This process wrote the object again: read it again."""
        with self._bad_lock:
            self._bad.discard(path)
            self._warned.discard(path)

    def _admission_check(self, path: str, data: bytes) -> None:
        """What the local layer runs on bytes fetched by a plain get before keeping them (FormatError: not kept)."""
        prefix = keys.ROOT + "/manifests/"
        if path.startswith(prefix):
            namespace, _, key = path[len(prefix) :].partition("/")
            self._parse_manifest(data, namespace, key)
            return
        digest = keys.parse_chunk_path(path)
        if digest is not None:
            codec = codecs.codec_of(data)
            decoded = codecs.decompress_at_most(codec, memoryview(data)[codecs.HEADER_SIZE :], chunking.MAX_CHUNK_SIZE)
            if codecs.sha256(decoded) != digest:
                raise CorruptChunkError(f"chunk {digest.hex()[:16]}… does not match its name")

    def lookup(self, namespace: str, key: str) -> Manifest | None:
        """The key's manifest as reads see it: None on a miss and for an unusable manifest (warned about once; a
        damaged local copy is dropped and the bucket's read instead). stat() raises for an unusable one."""
        return self._stat_checked(namespace, key)

    def _stat_checked(self, namespace: str, key: str) -> Manifest | None:
        """The manifest, or None on a miss. An unusable local copy is dropped and the bucket's read once; an
        unusable bucket copy is a miss, warned about once, and not asked for again by this process."""
        path = keys.manifest_path(namespace, key)
        if self._is_bad(path):
            return None
        held = self.local is not None and self.local.holds(path)
        try:
            return self.stat(namespace, key)
        except MovedEntryError:
            self._mark_bad(path, corrupt=False)  # damage, like a corrupt object: counted and logged by stat
            return None
        except UntrustedEntryError:
            # Counted and logged by stat. Asked for again: a trusted writer may sign the key any time, and the
            # verdict on unchanged bytes is cached, so a repeat costs one manifest read.
            return None
        except FormatError as exc:
            error = exc
        if held:
            assert self.local is not None
            self.local.forget(path)
            log.warning("castore: %s/%s: local copy of the manifest was unusable (%s); reading the bucket's", namespace, key, error)
            self._bump(corrupt=1)
            try:
                return self.stat(namespace, key)
            except FormatError as exc:
                error = exc
        self._mark_bad(path, corrupt=True, message="castore: %s/%s: unusable manifest treated as a miss: %s",
                       args=(namespace, key, error))
        return None

    def _load(self, namespace: str, key: str, read: Callable[[Manifest], _T | None]) -> tuple[Manifest | None, _T | None]:
        """(manifest, read(manifest)). When the read fails and the manifest came from the local layer, the local
        manifest may be the damaged part: it is dropped and the entry read once more from the bucket. An entry
        that still fails is remembered as bad (later reads miss without a request)."""
        path = keys.manifest_path(namespace, key)
        manifest = None
        for attempt in range(2):
            held = self.local is not None and self.local.holds(path)  # before this read fetched it
            manifest = self._stat_checked(namespace, key)
            if manifest is None:
                return None, None
            value = read(manifest)
            if value is not None:
                return manifest, value
            if not (held and attempt == 0):
                break
            assert self.local is not None
            self.local.forget(path)
        self._mark_bad(path, corrupt=False)  # warned about by the read that failed
        return manifest, None

    def _inline_data(self, manifest: Manifest) -> bytes | None:
        assert manifest.inline is not None
        try:
            return codecs.decode_chunk(manifest.inline, manifest.digest, manifest.size)
        except (CorruptChunkError, FormatError) as exc:
            self._corrupt(manifest, str(exc))
            return None

    def _read_blob(self, manifest: Manifest, progress: ProgressFn | None = None) -> bytes | None:
        parts: list[bytes | memoryview] = []

        def sink() -> Sink:
            parts.clear()
            return parts.append

        if not self._read_into(manifest, sink, progress):
            return None
        return parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)

    def _write_blob_file(self, manifest: Manifest, dest: str, progress: ProgressFn | None, keep_mode: bool) -> int | None:
        """Stream the blob into a temporary file beside dest; rename it over dest once the blob digest matched."""
        directory = os.path.dirname(dest) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                def sink() -> Sink:
                    f.seek(0)
                    f.truncate()
                    return f.write

                if not self._read_into(manifest, sink, progress):
                    return None
                mode = manifest.meta.get("mode")
                if keep_mode and isinstance(mode, int) and not isinstance(mode, bool):
                    os.fchmod(f.fileno(), safe_mode(mode))
                else:
                    os.fchmod(f.fileno(), 0o666 & ~current_umask())
            os.replace(tmp, dest)
            tmp = ""
            return manifest.size
        finally:
            if tmp:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass

    def _read_into(self, manifest: Manifest, open_sink: Callable[[], Sink], progress: ProgressFn | None) -> bool:
        """Feed the blob's bytes, in order, to a sink; True only if they match the manifest's digest (a sink
        must not be trusted before). open_sink() starts over (a second, strictly verified, pass)."""
        if manifest.inline is not None:
            data = self._inline_data(manifest)
            if data is None:
                return False
            open_sink()(data)
            if progress:
                progress(len(data))
            return True
        strict = False
        for _ in range(2):
            outcome = self._stream_chunks(manifest, open_sink(), progress, strict)
            if outcome is not None:
                return outcome
            strict, progress = True, None  # the blob digest failed: verify chunk by chunk (drops damaged local copies)
        return False

    def _stream_chunks(self, manifest: Manifest, sink: Sink, progress: ProgressFn | None, strict: bool) -> bool | None:
        """Fetch chunks in parallel (a bounded window ahead, so memory stays bounded by what was fetched) and feed
        them in order to sink while hashing the blob. True: every chunk arrived and the blob digest matches.
        False: a chunk is unusable, or (strict) the digest fails. None: the digest failed without strict
        verification of each chunk (a local copy may be damaged): the caller retries strictly."""
        refs = manifest.chunks
        owner = f"{manifest.namespace}/{manifest.key}"
        covered = len(refs) == 1 and refs[0].digest == manifest.digest  # one chunk: its check is the blob's
        hasher = None if covered else hashlib.sha256()
        strict = strict or covered
        pending: collections.deque = collections.deque()
        upcoming = iter(refs)
        # A chunk that repeats within the window is fetched once (a bad one must cost one request, not several).
        in_flight: dict[bytes, concurrent.futures.Future] = {}
        uses: collections.Counter[bytes] = collections.Counter()

        def submit_next() -> None:
            ref = next(upcoming, None)
            if ref is not None:
                future = in_flight.get(ref.digest)
                if future is None:
                    future = in_flight[ref.digest] = self._pool.submit(self._fetch_chunk, ref, strict, owner)
                uses[ref.digest] += 1
                pending.append((ref.digest, future))

        for _ in range(max(4, 2 * self._workers)):
            submit_next()
        try:
            while pending:
                digest, future = pending.popleft()
                uses[digest] -= 1
                if not uses[digest]:
                    del in_flight[digest]
                part = future.result()
                if part is None:
                    # The chunk's own warning named this entry: no second line for the same damage.
                    log.debug("castore: %s is incomplete or corrupt (a chunk is missing or corrupt)", owner)
                    return False
                submit_next()
                if hasher is not None:
                    hasher.update(part)
                sink(part)
                if progress:
                    progress(len(part))
        finally:
            for _, future in pending:
                future.cancel()
            concurrent.futures.wait([future for _, future in pending])  # nothing of this read runs on after it returns
        if hasher is not None and hasher.digest() != manifest.digest:
            if strict:
                self._corrupt(manifest, "blob digest mismatch")
                return False
            return None
        return True

    def _decode(self, obj: bytes, ref: ChunkRef, verify: bool) -> bytes | memoryview:
        """A chunk object decoded to exactly ref.size bytes (bounded: decompression bombs), hashed when verify."""
        if verify:
            return codecs.decode_chunk(obj, ref.digest, ref.size)
        codec = codecs.codec_of(obj)
        payload = memoryview(obj)[codecs.HEADER_SIZE :]
        if codec == codecs.CODEC_RAW:
            if len(payload) != ref.size:
                raise CorruptChunkError(f"raw chunk has {len(payload)} bytes, expected {ref.size}")
            return payload  # no copy of raw chunks
        return codecs.decompress(codec, payload, ref.size)

    def _fetch_chunk(self, ref: ChunkRef, strict: bool, owner: str) -> bytes | memoryview | None:
        """A decoded chunk, or None (missing or corrupt: warned about once and remembered). Bytes fetched from the
        bucket into the local layer are always verified before it keeps them; others only when strict (the
        caller checks the blob digest). A local copy that fails is dropped and the bucket asked once. BackendError
        propagates."""
        path = keys.chunk_path(ref.digest)
        if self._is_bad(path):
            return None
        try:
            if self.local is not None:
                got = self.local.get_checked(path, lambda obj, from_disk: self._decode(obj, ref, strict or not from_disk))
                part = None if got is None else got[0]
            else:
                obj = self.backend.get(path)
                part = None if obj is None else self._decode(obj, ref, strict)
        except FormatError as exc:
            self._mark_bad(path, corrupt=True, message=BAD_CHUNK, args=(ref.digest.hex(), f"failed verification: {exc}", owner))
            return None
        if part is None:
            self._mark_bad(path, corrupt=False, message=BAD_CHUNK, args=(ref.digest.hex(), f"is missing from {self.url}", owner))
        return part

    def _prefetch_chunk(self, ref: ChunkRef, owner: str) -> bool:
        """Bring one chunk into the local layer, verified; a copy already there is left to the read's check."""
        assert self.local is not None
        path = keys.chunk_path(ref.digest)
        if self._is_bad(path):
            return False

        def check(obj: bytes, from_disk: bool) -> bool:
            if not from_disk:
                codecs.decode_chunk(obj, ref.digest, ref.size)
            return True

        try:
            got = self.local.get_checked(path, check)
        except FormatError as exc:
            self._mark_bad(path, corrupt=True, message=BAD_CHUNK, args=(ref.digest.hex(), f"failed verification: {exc}", owner))
            return False
        if got is None:
            self._mark_bad(path, corrupt=False, message=BAD_CHUNK, args=(ref.digest.hex(), f"is missing from {self.url}", owner))
            return False
        return True

    def _corrupt(self, manifest: Manifest, why: str) -> None:
        self._warn_once(f"entry:{manifest.namespace}/{manifest.key}",
                        "castore: %s/%s is incomplete or corrupt (%s); treated as a miss", manifest.namespace, manifest.key, why)

    # -- listing, deleting, checking -------------------------------------------------------------
    def namespaces(self) -> list[str]:
        root = keys.ROOT + "/manifests/"
        return sorted({p[len(root) :].split("/", 1)[0] for p, _ in self.backend.list(root)})

    def list(self, namespace: str | None = None) -> Iterator[tuple[str, str, int]]:
        """(namespace, key, manifest bytes) for every key, optionally of one namespace."""
        prefix = keys.manifest_prefix(namespace) if namespace else keys.ROOT + "/manifests/"
        root = len(keys.ROOT + "/manifests/")
        for path, size in self.backend.list(prefix):
            ns, _, key = path[root:].partition("/")
            if key:
                yield ns, key, size

    def delete(self, namespace: str, key: str) -> bool:
        """Remove a key's manifest (chunks stay; they may be shared). False if the key was absent."""
        if self.read_only:
            raise ReadOnlyError(f"store {self.url} is read-only")
        path = keys.manifest_path(namespace, key)
        if not self.backend.exists(path):
            return False
        self.backend.delete(path)
        return True

    def verify(self, namespace: str | None = None, key: str | None = None, *, repair: bool = False) -> VerifyReport:
        """Re-hash every chunk of one key, or of every manifest (and every chunk object) in the store, as the
        bucket holds them (not the local layer's copies).

        With repair: a corrupt or missing chunk is uploaded again from a valid copy in the local layer; a chunk
        object beyond repair is deleted, with every manifest that needs it and every unusable manifest, so the
        next writer (the next compile) publishes the entry again.
        """
        if repair and self.read_only:
            raise ReadOnlyError(f"store {self.url} is read-only")
        report = VerifyReport()
        bucket = self._bucket
        if key is not None:
            assert namespace is not None
            targets = [(namespace, key)]
        else:
            targets = [(ns, k) for ns, k, _ in self.list(namespace)]
        usable: dict[bytes, bool] = {}  # digest -> a valid copy is in the bucket (after any repair)
        lock = threading.Lock()

        def problem_of(obj: bytes | None, digest: bytes, size: int | None) -> str | None:
            if obj is None:
                return "missing"
            try:
                if size is not None:
                    codecs.decode_chunk(obj, digest, size)
                else:
                    self._admission_check(keys.chunk_path(digest), obj)
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
                    ok = self._repair_chunk(digest, size, problem_of)
                    with lock:
                        if ok:
                            report.repaired.append(f"chunk {digest.hex()}")
                        elif obj is not None:
                            report.removed.append(f"chunk {digest.hex()}")
                    if not ok and obj is not None:
                        self.backend.delete(path)
            with lock:
                report.chunks += 1
                if obj is not None and ok:
                    report.bytes += size if size is not None else 0
                if not ok and not repair:
                    report.unresolved += 1
            return ok

        def remove_manifest(ns: str, k: str) -> None:
            if repair:
                self.backend.delete(keys.manifest_path(ns, k))
                self._forgive(keys.manifest_path(ns, k))
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
                manifest = self._parse_manifest(raw, ns, k)
            except FormatError as exc:
                report.bad.append(f"manifest {ns}/{k}: {exc}")
                remove_manifest(ns, k)
                continue
            report.manifests += 1
            if manifest.inline is not None:
                if self._inline_data(manifest) is None:
                    report.bad.append(f"manifest {ns}/{k}: inline data corrupt")
                    remove_manifest(ns, k)
                continue
            new = list({ref.digest: ref for ref in manifest.chunks if ref.digest not in usable}.values())
            for ref, ok in zip(new, self._pool.map(lambda r: check(r.digest, r.size), new)):
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

    def _repair_chunk(self, digest: bytes, size: int | None, problem_of: Callable[[bytes | None, bytes, int | None], str | None]) -> bool:
        """Upload a chunk again from a valid local-layer copy. False when this node holds none."""
        if self.local is None:
            return False
        path = keys.chunk_path(digest)
        local_copy = self.local.local_copy(path)
        if local_copy is None:
            return False
        if problem_of(local_copy, digest, size) is not None:
            self.local.forget(path)
            return False
        self._bucket.put(path, local_copy)
        self._forgive(path)
        log.warning("castore: chunk %s repaired from this node's local layer", digest.hex())
        return True

    def du(self, namespace: str | None = None) -> Usage:
        usage = Usage()
        unique: dict[bytes, int] = {}
        for ns, k, msize in self.list(namespace):
            try:
                manifest = self.stat(ns, k)
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


def _meta_value(value: object) -> object:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def extract_tree(manifest: Manifest, data: bytes | bytearray | memoryview, dest: str | os.PathLike[str]) -> None:
    """Write a tree manifest's files under dest, each atomically, with a safe mode (format/tree.safe_mode).

    Only regular files and directories, strictly inside dest: every entry is checked, and dest's existing
    directories are checked for symlinks in the way, before anything is written; directories are then opened
    relative to their parent with O_NOFOLLOW, so nothing is written or chmod-ed through a symlink.
    """
    entries = checked_entries(manifest.files)
    if sum(e.size for e, _ in entries if e.type == "f") != len(data):
        raise UnsafeTreeError(f"tree {manifest.namespace}/{manifest.key}: files add up to a size other than the blob's")
    root = os.fspath(dest)
    os.makedirs(root, exist_ok=True)
    _check_dest(root, entries)
    view = memoryview(data)
    dirs: dict[tuple[str, ...], int] = {(): os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)}

    def open_dir(parts: tuple[str, ...]) -> int:
        fd = dirs.get(parts)
        if fd is None:
            parent = open_dir(parts[:-1])
            try:
                os.mkdir(parts[-1], 0o700, dir_fd=parent)
            except FileExistsError:
                pass
            try:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            except OSError as exc:  # ELOOP (a symlink) or ENOTDIR: appeared since the check
                raise UnsafeTreeError(f"{'/'.join(parts)} in {root} is not a directory: {exc.strerror}") from exc
            dirs[parts] = fd
        return fd

    try:
        dir_modes = []
        pos = 0
        for entry, parts in entries:
            if entry.type == "d":
                dir_modes.append((open_dir(parts), safe_mode(entry.mode) | 0o700))
                continue
            _write_file_at(open_dir(parts[:-1]), parts[-1], view[pos : pos + entry.size], safe_mode(entry.mode))
            pos += entry.size
        for fd, mode in dir_modes:
            os.fchmod(fd, mode)
    finally:
        for fd in dirs.values():
            os.close(fd)


def _check_dest(root: str, entries: list[tuple[TreeEntry, tuple[str, ...]]]) -> None:
    """Before writing: no existing symlink or non-directory where a directory goes, no directory where a file goes."""
    import stat as stat_

    seen: set[tuple[str, ...]] = set()
    for entry, parts in entries:
        dir_parts = parts if entry.type == "d" else parts[:-1]
        for i in range(1, len(dir_parts) + 1):
            prefix = dir_parts[:i]
            if prefix in seen:
                continue
            seen.add(prefix)
            try:
                st = os.lstat(os.path.join(root, *prefix))  # parents already checked: no symlink followed
            except FileNotFoundError:
                break  # created by the restore
            if not stat_.S_ISDIR(st.st_mode):
                raise UnsafeTreeError(f"{'/'.join(prefix)} in {root} exists and is not a directory (a symlink?)")
        if entry.type == "f":
            try:
                st = os.lstat(os.path.join(root, *parts))
            except (FileNotFoundError, NotADirectoryError):
                continue
            if stat_.S_ISDIR(st.st_mode):
                raise UnsafeTreeError(f"{entry.path} in {root} exists and is a directory")


def _write_file_at(dir_fd: int, name: str, data: memoryview, mode: int) -> None:
    """Create name in the directory dir_fd atomically (a temporary file renamed over it, never following a link)."""
    import secrets

    tmp = f".tmp-{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), mode)
        try:
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except IsADirectoryError as exc:
            raise UnsafeTreeError(f"{name} exists and is a directory") from exc
        tmp = ""
    finally:
        if tmp:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
