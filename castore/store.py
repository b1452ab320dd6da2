"""The store: keyed blobs, files and directory trees over any backend, chunked, deduplicated and verified."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TypeVar

from castore import gc as gc_protocol
from castore.backends.base import Backend
from castore.errors import FormatError, MovedEntryError, ReadOnlyError, UntrustedEntryError
from castore.format import chunking, keys
from castore.format import codec as codecs
from castore.format.manifest import INLINE_THRESHOLD, ChunkRef, Manifest, TreeEntry, decode_envelope, encode_envelope
from castore.format.tree import checked_entries, scan_tree
from castore import maintenance
from castore.local_layer import LocalLayer
from castore.maintenance import Usage, VerifyReport
from castore.restore import extract_tree
from castore.verified_reads import ProgressFn, VerifiedReads
from castore.signing import SecretKey, TrustPolicy, Verdict, unchecked
from castore.version import __version__

log = logging.getLogger(__name__)

DEFAULT_MAX_BLOB_SIZE = 64 << 30
_T = TypeVar("_T")


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


class Store(VerifiedReads):
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
        """Re-hash every chunk of one key, a namespace or the whole store as the bucket holds them; with repair,
        mend what can be mended and remove what cannot (castore/maintenance.py)."""
        return maintenance.verify(self, namespace, key, repair=repair)

    def du(self, namespace: str | None = None) -> Usage:
        """Logical bytes against stored bytes, after dedup and compression (castore/maintenance.py)."""
        return maintenance.du(self, namespace)


def _meta_value(value: object) -> object:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
