"""The store: keyed blobs, files and directory trees over any backend, chunked, deduplicated and verified."""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from castore import __version__
from castore.backends.base import Backend
from castore.errors import CorruptChunkError, FormatError, ReadOnlyError
from castore.format import chunking, keys
from castore.format import codec as codecs
from castore.format.manifest import INLINE_THRESHOLD, ChunkRef, Manifest, TreeEntry
from castore.format.tree import safe_relpath, scan_tree
from castore.local_layer import LocalLayer

log = logging.getLogger(__name__)

DEFAULT_MAX_BLOB_SIZE = 64 << 30
ProgressFn = Callable[[int], None]


@dataclass
class PutResult:
    manifest: Manifest
    published: bool  # False: another writer published this key first and its manifest stands
    chunks_total: int = 0
    chunks_uploaded: int = 0
    bytes_uploaded: int = 0


@dataclass
class StoreStats:
    gets: int = 0
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
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
    bad: list[str] = field(default_factory=list)

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
    def __init__(
        self,
        backend: Backend,
        *,
        read_only: bool = False,
        max_blob_size: int = DEFAULT_MAX_BLOB_SIZE,
        workers: int | None = None,
    ) -> None:
        self.backend = backend
        self.read_only = read_only
        self.max_blob_size = max_blob_size
        self.local = backend if isinstance(backend, LocalLayer) else None
        self._pool = ThreadPoolExecutor(max_workers=workers or backend.max_concurrency, thread_name_prefix="castore")
        self.stats = StoreStats()
        self._stats_lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.backend.url

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.backend.close()

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
        return self._put(namespace, key, memoryview(data).cast("B"), kind="blob", meta=meta, overwrite=overwrite, progress=progress)

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
        return self._put(namespace, key, memoryview(blob), kind="tree", files=entries, meta=meta, overwrite=overwrite, progress=progress)

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
            refs = list(self._pool.map(lambda piece: self._upload_chunk(piece, progress, result), pieces))
            manifest.chunks = refs
            result.chunks_total = len(refs)
        published = self.backend.put(keys.manifest_path(namespace, key), manifest.to_bytes(), if_absent=not overwrite)
        result.published = published
        self._bump(puts=1, bytes_written=result.bytes_uploaded, chunks_uploaded=result.chunks_uploaded,
                   chunks_deduplicated=result.chunks_total - result.chunks_uploaded)
        return result

    def _upload_chunk(self, piece: memoryview, progress: ProgressFn | None, result: PutResult) -> ChunkRef:
        digest = codecs.sha256(piece)
        path = keys.chunk_path(digest)
        obj, codec = codecs.encode_chunk(piece)
        if not self.backend.exists(path):
            self.backend.put(path, obj)
            with self._stats_lock:
                result.chunks_uploaded += 1
                result.bytes_uploaded += len(obj)
        if progress:
            progress(len(piece))
        return ChunkRef(digest, len(piece), len(obj), codec)

    # -- reading ---------------------------------------------------------------------------------
    def stat(self, namespace: str, key: str) -> Manifest | None:
        """The key's manifest, or None. Raises FormatError for a manifest that cannot be trusted."""
        raw = self.backend.get(keys.manifest_path(namespace, key))
        if raw is None:
            return None
        try:
            manifest = Manifest.from_bytes(raw, max_size=self.max_blob_size)
        except FormatError:
            if self.local is not None:
                self.local.forget(keys.manifest_path(namespace, key))
            raise
        if (manifest.namespace, manifest.key) != (namespace, key):
            raise FormatError(f"manifest at {namespace}/{key} describes {manifest.namespace}/{manifest.key}")
        return manifest

    def contains(self, namespace: str, key: str) -> bool:
        return self.backend.exists(keys.manifest_path(namespace, key))

    def get(self, namespace: str, key: str, *, progress: ProgressFn | None = None) -> bytes | None:
        """The blob's bytes, or None on a miss. A corrupt or incomplete entry is a miss plus a warning."""
        self._bump(gets=1)
        manifest = self._stat_for_read(namespace, key)
        if manifest is None:
            self._bump(misses=1)
            return None
        data = self._read_blob(manifest, progress)
        self._bump(**({"hits": 1, "bytes_read": len(data)} if data is not None else {"misses": 1}))
        return bytes(data) if data is not None else None

    def get_many(self, namespace: str, keys_: Iterable[str]) -> dict[str, bytes | None]:
        """Fetch many keys at once: manifests in parallel, then every chunk of every key in parallel."""
        wanted = list(dict.fromkeys(keys_))
        manifests = dict(zip(wanted, self._pool.map(lambda k: self._stat_for_read(namespace, k), wanted)))
        jobs = [(k, ref) for k, m in manifests.items() if m is not None and m.inline is None for ref in m.chunks]
        unique = {ref.digest: ref for _, ref in jobs}
        fetched = dict(zip(unique, self._pool.map(self._fetch_chunk_or_none, unique.values())))
        out: dict[str, bytes | None] = {}
        for k in wanted:
            m = manifests[k]
            data = None
            if m is not None:
                if m.inline is not None:
                    data = self._inline_data(m)
                else:
                    parts = [fetched[ref.digest] for ref in m.chunks]
                    data = b"".join(parts) if all(p is not None for p in parts) else None  # type: ignore[arg-type]
                    if data is not None and hashlib.sha256(data).digest() != m.digest:
                        self._corrupt(m, "blob digest mismatch")
                        data = None
            out[k] = data
            self._bump(gets=1, **({"hits": 1, "bytes_read": len(data)} if data is not None else {"misses": 1}))
        return out

    def prefetch(self, namespace: str, keys_: Iterable[str]) -> int:
        """Bring the objects of many keys into the local layer, in parallel, without decoding them: a later get
        reads (and verifies) them locally. Returns how many keys are now held; 0 without a local layer."""
        if self.local is None:
            return 0
        wanted = list(dict.fromkeys(keys_))
        manifests = [m for m in self._pool.map(lambda k: self._stat_for_read(namespace, k), wanted) if m is not None]
        paths = list(dict.fromkeys(keys.chunk_path(ref.digest) for m in manifests if m.inline is None for ref in m.chunks))
        held = dict(zip(paths, self._pool.map(lambda p: self.backend.get(p) is not None, paths)))
        return sum(1 for m in manifests if m.inline is not None or all(held[keys.chunk_path(r.digest)] for r in m.chunks))

    def get_file(self, namespace: str, key: str, dest: str | os.PathLike[str], *, progress: ProgressFn | None = None) -> bool:
        """Write the blob to dest atomically. False on a miss."""
        self._bump(gets=1)
        manifest = self._stat_for_read(namespace, key)
        data = self._read_blob(manifest, progress) if manifest is not None else None
        if data is None:
            self._bump(misses=1)
            return False
        from castore.fsutil import write_atomic

        write_atomic(os.fspath(dest), data)
        mode = manifest.meta.get("mode") if manifest else None
        if isinstance(mode, int):
            os.chmod(dest, mode & 0o7777)
        self._bump(hits=1, bytes_read=len(data))
        return True

    def get_tree(self, namespace: str, key: str, dest: str | os.PathLike[str], *, progress: ProgressFn | None = None) -> bool:
        """Recreate a stored directory tree under dest (files with their modes). False on a miss."""
        self._bump(gets=1)
        manifest = self._stat_for_read(namespace, key)
        if manifest is None or manifest.kind != "tree":
            self._bump(misses=1)
            if manifest is not None:
                raise FormatError(f"{namespace}/{key} is a {manifest.kind}, not a tree")
            return False
        data = self._read_blob(manifest, progress)
        if data is None:
            self._bump(misses=1)
            return False
        extract_tree(manifest, data, dest)
        self._bump(hits=1, bytes_read=len(data))
        return True

    def read_blob(self, manifest: Manifest, progress: ProgressFn | None = None) -> bytes | None:
        """The verified blob of a manifest stat() returned, or None when a chunk is missing or corrupt."""
        return self._read_blob(manifest, progress)

    def _stat_for_read(self, namespace: str, key: str) -> Manifest | None:
        try:
            return self.stat(namespace, key)
        except FormatError as exc:
            log.warning("castore: %s/%s: unusable manifest treated as a miss: %s", namespace, key, exc)
            self._bump(corrupt=1)
            return None

    def _inline_data(self, manifest: Manifest) -> bytes | None:
        assert manifest.inline is not None
        try:
            return codecs.decode_chunk(manifest.inline, manifest.digest, manifest.size)
        except (CorruptChunkError, FormatError) as exc:
            self._corrupt(manifest, str(exc))
            return None

    def _read_blob(self, manifest: Manifest, progress: ProgressFn | None = None) -> bytes | None:
        if manifest.inline is not None:
            return self._inline_data(manifest)
        refs = manifest.chunks
        if len(refs) == 1:  # the chunk digest is the blob digest: one verification covers both
            data = self._fetch_chunk_or_none(refs[0])
            if data is None:
                self._corrupt(manifest, "a chunk is missing or corrupt")
                return None
            if progress:
                progress(refs[0].size)
            return bytes(data)
        # Fast path, one SHA-256 pass and no serial copy: workers fetch and decode chunks in parallel and copy
        # each into its place in the result (a calloc'd bytes object that io.BytesIO hands back without a copy),
        # while this thread hashes the blob in order as the chunks land. The chunks are trusted only if the whole
        # blob matches the manifest's digest; a mismatch falls back to verifying each chunk, which drops damaged
        # local copies and refetches.
        result = io.BytesIO(bytes(manifest.size))
        buf = result.getbuffer()
        offsets = list(itertools.accumulate((ref.size for ref in refs), initial=0))

        def fill(i: int) -> bool:
            part = self._fetch_chunk_unverified(refs[i])
            if part is None:
                return False
            buf[offsets[i] : offsets[i + 1]] = part
            return True

        futures = [self._pool.submit(fill, i) for i in range(len(refs))]
        hasher = hashlib.sha256()
        ok = True
        try:
            for i, future in enumerate(futures):
                if future.result():
                    if ok:
                        hasher.update(buf[offsets[i] : offsets[i + 1]])
                    if progress:
                        progress(refs[i].size)
                else:
                    ok = False
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        buf.release()
        if ok and hasher.digest() == manifest.digest:
            return result.getvalue()
        parts = list(self._pool.map(self._fetch_chunk_or_none, refs))
        if any(p is None for p in parts):
            self._corrupt(manifest, "a chunk is missing or corrupt")
            return None
        # Chunks are verified one by one; the blob digest catches a manifest that lists the wrong chunks.
        data = b"".join(parts)  # type: ignore[arg-type]
        if hashlib.sha256(data).digest() != manifest.digest:
            self._corrupt(manifest, "blob digest mismatch")
            return None
        return data

    def _fetch_chunk_unverified(self, ref: ChunkRef) -> bytes | memoryview | None:
        """A chunk decoded to exactly ref.size bytes, not yet hashed (the caller checks the blob digest), or None.

        Decompression stays bounded by ref.size (decompression bombs). BackendError propagates.
        """
        obj = self.backend.get(keys.chunk_path(ref.digest))
        if obj is None:
            return None
        try:
            codec = codecs.codec_of(obj)
            payload = memoryview(obj)[codecs.HEADER_SIZE :]
            if codec == codecs.CODEC_RAW:
                return payload if len(payload) == ref.size else None  # no copy of raw chunks
            return codecs.decompress(codec, payload, ref.size)
        except FormatError:
            return None

    def _fetch_chunk_or_none(self, ref: ChunkRef) -> bytes | None:
        """A verified chunk, or None (missing or corrupt, with a warning). BackendError propagates."""
        path = keys.chunk_path(ref.digest)
        obj = self.backend.get(path)
        if obj is None:
            log.warning("castore: chunk %s is missing from %s", ref.digest.hex(), self.url)
            return None
        try:
            return codecs.decode_chunk(obj, ref.digest, ref.size)
        except FormatError as exc:
            if self.local is not None and self.local.holds(path):
                # A damaged local copy: drop it and ask the bucket once more.
                self.local.forget(path)
                log.warning("castore: local copy of chunk %s was corrupt (%s); refetching", ref.digest.hex(), exc)
                return self._fetch_chunk_or_none(ref)
            log.warning("castore: chunk %s failed verification: %s", ref.digest.hex(), exc)
            self._bump(corrupt=1)
            return None

    def _corrupt(self, manifest: Manifest, why: str) -> None:
        log.warning("castore: %s/%s is incomplete or corrupt (%s); treated as a miss", manifest.namespace, manifest.key, why)

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

    def verify(self, namespace: str | None = None, key: str | None = None) -> VerifyReport:
        """Re-hash every chunk of one key, or of every manifest (and every chunk object) in the store."""
        report = VerifyReport()
        if key is not None:
            assert namespace is not None
            targets = [(namespace, key)]
        else:
            targets = [(ns, k) for ns, k, _ in self.list(namespace)]
        seen: set[bytes] = set()
        lock = threading.Lock()

        def check(ref: ChunkRef) -> None:
            with lock:
                if ref.digest in seen:
                    return
                seen.add(ref.digest)
            obj = self.backend.get(keys.chunk_path(ref.digest))
            problem = None
            if obj is None:
                problem = "missing"
            else:
                try:
                    codecs.decode_chunk(obj, ref.digest, ref.size)
                except FormatError as exc:
                    problem = str(exc)
            with lock:
                report.chunks += 1
                report.bytes += ref.size
                if problem:
                    report.bad.append(f"chunk {ref.digest.hex()}: {problem}")

        for ns, k in targets:
            try:
                manifest = self.stat(ns, k)
            except FormatError as exc:
                report.bad.append(f"manifest {ns}/{k}: {exc}")
                continue
            if manifest is None:
                report.bad.append(f"manifest {ns}/{k}: missing")
                continue
            report.manifests += 1
            if manifest.inline is not None:
                if self._inline_data(manifest) is None:
                    report.bad.append(f"manifest {ns}/{k}: inline data corrupt")
                continue
            list(self._pool.map(check, manifest.chunks))
        if key is None and namespace is None:
            # Whole store: also every chunk object no manifest names.
            for path, _ in self.backend.list(keys.ROOT + "/chunks/"):
                digest = keys.parse_chunk_path(path)
                if digest is None or digest in seen:
                    continue
                obj = self.backend.get(path)
                report.chunks += 1
                try:
                    if obj is None:
                        raise FormatError("vanished")
                    codec = codecs.codec_of(obj)
                    payload = memoryview(obj)[codecs.HEADER_SIZE :]
                    size = len(payload) if codec == codecs.CODEC_RAW else chunking.MAX_CHUNK_SIZE
                    data = codecs.decompress_at_most(codec, payload, size)
                    if codecs.sha256(data) != digest:
                        raise CorruptChunkError("does not match its name")
                    report.bytes += len(data)
                except FormatError as exc:
                    report.bad.append(f"chunk {digest.hex()}: {exc}")
        return report

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


def extract_tree(manifest: Manifest, data: bytes | bytearray, dest: str | os.PathLike[str]) -> None:
    """Write a tree manifest's files under dest, each atomically, with its mode."""
    from castore.fsutil import write_atomic

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    view = memoryview(data)
    pos = 0
    for entry in manifest.files:
        target = dest / safe_relpath(entry.path)
        if entry.type == "d":
            target.mkdir(parents=True, exist_ok=True)
            os.chmod(target, entry.mode | 0o700)
            continue
        write_atomic(str(target), view[pos : pos + entry.size])
        os.chmod(target, entry.mode)
        pos += entry.size
