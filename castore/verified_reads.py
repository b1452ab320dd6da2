"""How the store reads chunk objects: each one verified once, a bad local copy dropped and fetched from the
bucket once, the objects found bad remembered for the rest of the process (one warning each, no more requests).

``VerifiedReads`` is the part of ``castore.store.Store`` that fetches, decodes and checks chunks and streams a
blob to memory or to a file; the Store gives it its backend, local layer, thread pool and counters.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from castore.errors import CorruptChunkError, FormatError
from castore.format import chunking, keys
from castore.format import codec as codecs
from castore.format.manifest import ChunkRef, Manifest
from castore.format.tree import safe_mode
from castore.fsutil import current_umask

if TYPE_CHECKING:
    from castore.backends.base import Backend
    from castore.local_layer import LocalLayer

log = logging.getLogger("castore.store")

ProgressFn = Callable[[int], None]
_R = TypeVar("_R")
# One warning per bad chunk per process, naming the entry that needed it (others that share it miss silently).
BAD_CHUNK = "castore: chunk %s %s; %s (and any entry that shares it) is treated as a miss"
Sink = Callable[[bytes | memoryview], object]


class VerifiedReads:
    # Given by the Store.
    backend: Backend
    local: LocalLayer | None
    url: str
    _pool: ThreadPoolExecutor
    _workers: int
    _bad: set[str]
    _warned: set[str]
    _bad_lock: threading.Lock

    def _bump(self, **counts: int) -> None: ...  # noqa: D102 - the Store's counters

    def _parse_manifest(self, raw: bytes, namespace: str, key: str) -> Manifest: ...  # noqa: D102

    @property
    def bad_objects(self) -> frozenset[str]:
        """Object paths this process found corrupt or missing and no longer asks for."""
        with self._bad_lock:
            return frozenset(self._bad)

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

        def read(path: str) -> bytes | memoryview | None:
            if self.local is not None:
                got = self.local.get_checked(path, lambda obj, from_disk: self._decode(obj, ref, strict or not from_disk))
                return None if got is None else got[0]
            obj = self.backend.get(path)
            return None if obj is None else self._decode(obj, ref, strict)

        return self._chunk_or_none(ref, owner, read)

    def _prefetch_chunk(self, ref: ChunkRef, owner: str) -> bool:
        """Bring one chunk into the local layer, verified; a copy already there is left to the read's check."""
        local = self.local
        assert local is not None

        def check(obj: bytes, from_disk: bool) -> bool:
            if not from_disk:
                codecs.decode_chunk(obj, ref.digest, ref.size)
            return True

        return self._chunk_or_none(ref, owner, lambda path: local.get_checked(path, check)) is not None

    def _chunk_or_none(self, ref: ChunkRef, owner: str, read: Callable[[str], _R | None]) -> _R | None:
        """read(the chunk's path), or None when the chunk is known bad, fails verification (FormatError) or is
        missing: the last two remembered and warned about once, naming the entry that needed it."""
        path = keys.chunk_path(ref.digest)
        if self._is_bad(path):
            return None
        try:
            value = read(path)
        except FormatError as exc:
            self._mark_bad(path, corrupt=True, message=BAD_CHUNK, args=(ref.digest.hex(), f"failed verification: {exc}", owner))
            return None
        if value is None:
            self._mark_bad(path, corrupt=False, message=BAD_CHUNK, args=(ref.digest.hex(), f"is missing from {self.url}", owner))
        return value

    def _corrupt(self, manifest: Manifest, why: str) -> None:
        self._warn_once(f"entry:{manifest.namespace}/{manifest.key}",
                        "castore: %s/%s is incomplete or corrupt (%s); treated as a miss", manifest.namespace, manifest.key, why)
