"""The torch integration's view of the store: never raises, bounds every wait, writes in the background.

A store failure costs one warning, one bounded wait, and then the store is skipped for ``error_backoff``
seconds (a circuit breaker), so a job whose bucket is down or slow compiles as if castore were absent.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401 - registers its exit hook now, so that _flush_at_exit runs before it
import json
import logging
import os
import queue
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from castore.config import Config
from castore.errors import BackendUnavailable, CastoreError, InvalidKeyError, is_access_denied
from castore.format import keys as keyfmt
from castore.format.codec import sha256
from castore.torch.compile_activity import WriteGate
from castore.torch.recording import TouchRecorder
from castore.torch.session_stats import CacheCounters, SessionStats

log = logging.getLogger("castore.torch")

# The first lookup of a process in one of these caches anchors its fetch plan (see StoreSession.get).
PLAN_ANCHORS = ("aot-function", "aot-autograd", "fx-graph")
PLAN_FORMAT = 1
PLAN_LIMIT = 4096  # entries; a plan names what one job compiled, not a whole bucket
# A plan read faster than this came from the local layer or a store next door: there, on a machine of few CPUs,
# one lookup after another costs less than a parallel fetch competing with the compile (docs/TORCH.md). With
# this many CPUs or more, the plan is fetched in parallel whatever the round trip.
PREFETCH_MIN_ROUND_TRIP = 0.010
PREFETCH_ALWAYS_CPUS = 4


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# A queued write: (cache, torch key, bytes, meta[, overwrite]).
_WriteItem = tuple[str, str, "bytes | FileData", dict[str, object]] | tuple[str, str, "bytes | FileData", dict[str, object], bool]
DEFERRED = "deferred"  # background work that is not an entry of the store (copies into PyTorch's local dirs)
# A bundle (castore prewarm) whose closure a process brings into the node's local layer at start (castore.bundles).
BUNDLE_ENV = "CASTORE_BUNDLE"


@dataclass(frozen=True)
class FileData:
    """An entry's bytes as a file, read when the entry is written."""

    path: str

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()


def castore_key(key: str) -> str:
    """PyTorch's key when castore accepts it verbatim, else a digest of it (long or exotic keys)."""
    try:
        return keyfmt.validate_key(key)
    except InvalidKeyError:
        return "sha256-" + sha256(key.encode("utf-8", "surrogatepass")).hex()


_sessions: weakref.WeakSet[StoreSession] = weakref.WeakSet()


_held_over_fork: list[threading.Lock] = []


def _before_fork() -> None:
    # A store being opened on another thread is half-imported (castore.backends.s3, urllib3): a child forked now
    # would inherit partially initialised modules for good. Wait for the opening to finish (it does no I/O).
    for session in list(_sessions):
        if session._store_lock.acquire(timeout=10):
            _held_over_fork.append(session._store_lock)


def _after_fork_in_parent() -> None:
    while _held_over_fork:
        _held_over_fork.pop().release()


def _after_fork_in_child() -> None:
    _held_over_fork.clear()
    for session in list(_sessions):
        session._start_fresh()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


def _flush_at_exit() -> None:
    """Write each open session's fetch plan and queued entries before the interpreter shuts its threads down.

    An atexit handler runs too late: by then concurrent.futures has refused new work ("cannot schedule new futures
    after interpreter shutdown") and every upload that needs the store's thread pool (blobs above the inline size)
    fails. Hooks registered with threading._register_atexit run before that, newest first; this one is registered
    after concurrent.futures' own (imported above), so it runs while the pool still takes work."""
    deadline = time.monotonic() + max((s.config.flush_timeout for s in list(_sessions)), default=0.0)
    for session in list(_sessions):
        try:
            session.close(timeout=max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt:  # Ctrl-C while waiting: close() has said what is not stored
            return
        except BaseException as exc:  # noqa: BLE001 - never break the interpreter's shutdown
            log.warning("castore: flushing at exit stopped: %r", exc)


try:
    threading._register_atexit(_flush_at_exit)  # type: ignore[attr-defined]
except (AttributeError, RuntimeError):  # a Python without it, or imported during shutdown: atexit still flushes
    atexit.register(_flush_at_exit)


class StoreSession:
    def __init__(self, config: Config, namespace: str, *, open_store: Callable[[], object] | None = None) -> None:
        self.config = config
        self.namespace = keyfmt.validate_namespace(namespace)
        self._open_store = open_store
        self._disabled_until = 0.0
        self._warned = False
        self._read_only = config.read_only  # also set on the first write refused for want of permission
        # A bundle names everything the job needs: it supersedes fetch plans (neither read nor written).
        self._bundled = bool(os.environ.get(BUNDLE_ENV))
        self.write_gate = WriteGate()  # writes wait while this process compiles (fed by castore.torch.compile_activity)
        self._start_fresh()
        _sessions.add(self)
        atexit.register(self.close)

    def _start_fresh(self) -> None:
        """Threads, locks, connections and counters of this process. Also run in a forked child (Inductor's
        compile workers fork): the parent's writer and store-opening threads do not exist there, a lock they held
        would stay held, and an HTTP connection pool must not be shared across a fork."""
        self._store = None
        self._store_lock = threading.Lock()
        self.write_gate.reset()
        self.stats = SessionStats()
        self._stats_lock = threading.Lock()
        self._queue: queue.Queue[tuple[float, _WriteItem | Callable[[], None]] | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._pending = 0
        self._pending_by_cache: Counter[str] = Counter()  # queued and not yet done, per cache (DEFERRED: other work)
        self._pending_cv = threading.Condition()
        self._abandoned = False  # exit's flush ran out of time: queued work is dropped, not started
        self._touched: dict[tuple[str, str], None] = {}  # (cache, torch key) read or written, in first-use order
        self._anchor: tuple[str, str] | None = None
        self._plan: set[tuple[str, str]] | None = None  # the stored plan's entries, once read
        self._plan_stored = False  # the read found a stored plan (else this process may only create one)
        self._prefetcher: threading.Thread | None = None
        self._closed = False
        self._wrote = False  # this process queued an entry (it compiled something)
        self._recorder = TouchRecorder.from_environment()  # under `castore prewarm`: what this process used
        self._bundle_done: threading.Event | None = None  # set when the CASTORE_BUNDLE prefetch has finished
        self._bundle_deadline: float | None = None

    # -- plumbing --------------------------------------------------------------------------------
    @property
    def store(self):  # noqa: ANN201 - castore.Store, imported lazily
        if self._store is None:
            with self._store_lock:
                if self._store is None:
                    started = time.monotonic()
                    if self._open_store is not None:
                        self._store = self._open_store()
                    else:
                        from castore import open_store

                        self._store = open_store(config=self.config)
                    self.stats.store_open_seconds = time.monotonic() - started
        return self._store

    def prewarm(self) -> None:
        """Open the store on a background thread (imports, credentials and the connection pool),
        so that it overlaps with model construction and tracing instead of delaying the first cache lookup."""

        bundle = os.environ.get(BUNDLE_ENV)
        if bundle:
            self._bundle_done = threading.Event()

        def open_quietly() -> None:
            try:
                _ = self.store
                if bundle:
                    self._prefetch_bundle(bundle)
            except Exception as exc:  # noqa: BLE001 - the first get reports and handles it
                log.debug("castore: opening the store failed: %s", exc)
            finally:
                if self._bundle_done is not None:
                    self._bundle_done.set()

        threading.Thread(target=open_quietly, name="castore-open", daemon=True).start()

    def _prefetch_bundle(self, ref: str) -> None:
        """Bring the bundle's closure into the local layer with a few ranged GETs (castore.bundles)."""
        from castore.bundles import prefetch_into_local

        try:
            report = prefetch_into_local(self.store, ref)
        except Exception as exc:  # noqa: BLE001 - an optimisation: lookups fetch what it did not
            log.info("castore: prefetching bundle %s failed: %s", ref, exc)
            return
        if report is not None:
            with self._stats_lock:
                self.stats.prefetched += report.objects
            log.info("castore: bundle %s: %d objects prefetched, %d held already", ref, report.objects, report.skipped)

    def _await_bundle(self) -> None:
        """The first lookups wait for the bundle's prefetch, at most store_wait seconds in all."""
        done = self._bundle_done
        if done is None or done.is_set():
            return
        if self._bundle_deadline is None:
            self._bundle_deadline = time.monotonic() + self.config.store_wait
        done.wait(max(0.0, self._bundle_deadline - time.monotonic()))

    def available(self) -> bool:
        return time.monotonic() >= self._disabled_until

    def _trip(self, what: str, exc: BaseException | str) -> None:
        self._disabled_until = time.monotonic() + self.config.error_backoff
        if not self._warned:
            self._warned = True
            log.warning(
                "castore: %s failed (%s); compiling without the store for %.0f s", what, exc, self.config.error_backoff
            )
        else:
            log.debug("castore: %s failed again: %s", what, exc)

    def _counters(self, cache: str) -> CacheCounters:
        return self.stats.caches[cache]

    # -- reads -----------------------------------------------------------------------------------
    def get(self, cache: str, key: str) -> bytes | None:
        """The stored bytes for PyTorch's key, or None. Never raises."""
        counters = self._counters(cache)
        if self._anchor is None and cache in PLAN_ANCHORS and self.available():
            self._anchor = (cache, key)
            if self.config.prefetch and not self._bundled:
                self._start_prefetch()
        if not self.available():
            with self._stats_lock:
                counters.skipped += 1
                counters.misses += 1
            return None
        self._await_bundle()
        start = time.monotonic()
        try:
            store = self.store
            data = self._within_store_wait(lambda: store.get(self.namespace, castore_key(key)))
        except (CastoreError, OSError) as exc:
            elapsed = time.monotonic() - start
            with self._stats_lock:
                counters.get_errors += 1
                counters.misses += 1
                counters.seconds_waited += elapsed
            self._trip(f"get from {self.config.url}", exc)
            return None
        except Exception as exc:  # noqa: BLE001 - a backend must never break compilation
            log.warning("castore: unexpected error in get: %r", exc, exc_info=True)
            with self._stats_lock:
                counters.get_errors += 1
                counters.misses += 1
            return None
        elapsed = time.monotonic() - start
        self._layer_account(store)
        with self._stats_lock:
            counters.seconds_waited += elapsed
            if data is None:
                counters.misses += 1
            else:
                counters.hits += 1
                counters.bytes_read += len(data)
                self._touch(cache, key)
        if elapsed > self.config.slow_request:
            # A store this slow costs more than it saves: stop asking for a while.
            self._trip(f"a get taking {elapsed:.1f} s (over slow_request={self.config.slow_request} s)", "slow store")
        return data

    def _within_store_wait(self, fn: Callable[[], bytes | None]) -> bytes | None:
        """fn() on a daemon thread, waited for at most store_wait seconds: a hung connection (read timeouts times
        retries) must not hold up the compile, nor the interpreter's exit."""
        box: list[object] = []
        done = threading.Event()

        def run() -> None:
            try:
                box.append(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                box.append(exc)
            finally:
                done.set()

        threading.Thread(target=run, name="castore-get", daemon=True).start()
        if not done.wait(self.config.store_wait):
            raise BackendUnavailable(f"no answer within store_wait={self.config.store_wait} s")
        result = box[0]
        if isinstance(result, BaseException):
            raise result
        return result  # type: ignore[return-value]

    def note_saved(self, cache: str, seconds: float) -> None:
        with self._stats_lock:
            self._counters(cache).seconds_saved += seconds

    def _layer_account(self, store) -> None:  # noqa: ANN001
        """Mirror the local layer's counters (hits served on the node, objects fetched from the bucket) and the
        store's count of refused (untrusted) entries."""
        stats = getattr(store, "stats", None)
        if stats is not None:
            with self._stats_lock:
                self.stats.untrusted = getattr(stats, "untrusted", 0)
        local = getattr(store, "local", None)
        if local is None:
            return
        with self._stats_lock:
            self.stats.local_hits = local.stats.hits
            self.stats.bucket_fetches = local.stats.misses

    # -- fetch plans -----------------------------------------------------------------------------
    # A process reads its graphs' entries one lookup at a time, in PyTorch's order: AOTAutograd, FX, then each
    # kernel, each a round trip to the bucket on a fresh machine. At exit, a process records what it read or
    # wrote, keyed by its first graph lookup (the anchor). The next fresh process to make that same first
    # lookup fetches the whole list at once, in parallel, into the local layer, where its later lookups find it.
    def plan_key(self, anchor: tuple[str, str]) -> str:
        return "plan." + sha256(f"{anchor[0]}\0{anchor[1]}".encode("utf-8", "surrogatepass")).hex()

    def _touch(self, cache: str, key: str) -> None:
        if len(self._touched) < 2 * PLAN_LIMIT:
            self._touched[(cache, key)] = None
        if self._recorder is not None:
            self._recorder.note(self.namespace, castore_key(key))

    def _start_prefetch(self) -> None:
        anchor = self._anchor
        assert anchor is not None

        def run() -> None:
            try:
                store = self.store
                started = time.monotonic()
                raw = store.get(self.namespace, self.plan_key(anchor))
                round_trip = time.monotonic() - started
                entries = decode_plan(raw) if raw is not None else []
                self._plan_stored = raw is not None
                self._plan = set(entries)
                wanted = [castore_key(k) for c, k in entries if (c, k) != anchor]
                if wanted and (round_trip >= PREFETCH_MIN_ROUND_TRIP or usable_cpus() >= PREFETCH_ALWAYS_CPUS):
                    held = store.prefetch(self.namespace, wanted)
                    with self._stats_lock:
                        self.stats.prefetched += held
            except Exception as exc:  # noqa: BLE001 - a prefetch is an optimisation; lookups report real failures
                log.debug("castore: prefetch failed: %s", exc)

        self._prefetcher = threading.Thread(target=run, name="castore-prefetch", daemon=True)
        self._prefetcher.start()

    def _write_plan(self) -> None:
        """Queue this process's fetch plan when it differs from the stored one.

        A process that compiled something (it wrote entries) adds what it used to the stored plan. A process
        that only read narrows the plan to what it read: what a fresh machine needs, not everything a cold
        compile wrote (the Triton kernels of an FX entry's bundle, for one, are never looked up again).
        """
        if self._anchor is None or self._read_only or self._bundled or not self.available():
            return
        touched = [entry for entry in list(self._touched) if entry != self._anchor]
        known = self._plan or set()
        if not touched or set(touched) == known:
            return
        if self._wrote and set(touched) <= known:
            return
        extra = sorted(known - set(touched)) if self._wrote else []
        merged = list(dict.fromkeys(touched + extra))[:PLAN_LIMIT]
        self._plan = set(merged)
        # Only a process that read the stored plan replaces it. One that found none (or had not read it yet)
        # creates one if there still is none: many fresh processes of a node starting at once must not each
        # overwrite the plan the others are reading.
        replace = self._plan_stored
        self._enqueue(("fetch-plan", self.plan_key(self._anchor), encode_plan(merged), {"artifact": "fetch-plan"}, replace))

    # -- writes (background) ---------------------------------------------------------------------
    def put(self, cache: str, key: str, data: bytes | FileData, meta: dict[str, object] | None = None) -> None:
        """Queue a write; returns at once. Never raises."""
        if self._read_only:
            return
        if self._recorder is not None:  # needed by the job even when the write below is skipped: prewarm checks
            self._recorder.note(self.namespace, castore_key(key))
        if not self.available():
            with self._stats_lock:
                self._counters(cache).skipped += 1
            return
        self._touch(cache, key)
        self._wrote = True
        self._enqueue((cache, key, data if isinstance(data, FileData) else bytes(data), dict(meta or {})))

    def put_file(self, cache: str, key: str, path: str, meta: dict[str, object] | None = None) -> None:
        """Queue a write of a file's bytes, read by the background writer (not on the caller's thread). A file
        gone or unreadable by then is not written. Never raises."""
        self.put(cache, key, FileData(path), meta)

    def defer(self, fn: Callable[..., None], *args: object) -> None:
        """Run fn(*args) on the background writer (work that only later processes need). Never raises."""
        self._enqueue(lambda: fn(*args))

    def _enqueue(self, item: _WriteItem | Callable[[], None]) -> None:
        with self._pending_cv:
            self._pending += 1
            self._pending_by_cache[DEFERRED if callable(item) else item[0]] += 1
        if self._writer is None or not self._writer.is_alive():
            self._writer = threading.Thread(target=self._write_loop, name="castore-writer", daemon=True)
            self._writer.start()
        self._queue.put((time.monotonic(), item))

    def _write_loop(self) -> None:
        while True:
            queued = self._queue.get()
            if queued is None:
                return
            queued_at, item = queued
            cache = DEFERRED if callable(item) else item[0]
            try:
                if not self._abandoned:
                    held = self.write_gate.wait(queued_at)  # off the compile's critical path
                    with self._stats_lock:
                        self.stats.writes_held_seconds += held
                if self._abandoned:
                    continue  # counted in close()'s warning
                if callable(item):
                    self._run_deferred(item)
                elif self._read_only:
                    pass  # the credentials turned out read-only: nothing more is sent
                else:
                    self._write(*item)
            finally:
                with self._pending_cv:
                    self._pending -= 1
                    self._pending_by_cache[cache] -= 1
                    self._pending_cv.notify_all()

    def _run_deferred(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - deferred work is best effort
            log.debug("castore: deferred work failed: %s", exc)

    def _write(self, cache: str, key: str, data: bytes | FileData, meta: dict[str, object], overwrite: bool = True) -> None:
        counters = self._counters(cache)
        if isinstance(data, FileData):
            try:
                data = data.read()
            except OSError as exc:
                log.debug("castore: %s entry not written, its file is unreadable: %s", cache, exc)
                return
        try:
            if self.available():
                meta.setdefault("artifact", cache)
                self.store.put(self.namespace, castore_key(key), data, meta=meta, overwrite=overwrite)
                with self._stats_lock:
                    counters.puts += 1
                    counters.bytes_written += len(data)
            else:
                with self._stats_lock:
                    counters.skipped += 1
        except Exception as exc:  # noqa: BLE001 - writes may fail silently (counted, logged once)
            with self._stats_lock:
                counters.put_errors += 1
            if self._abandoned:  # cancelled at exit: close() has reported it
                log.debug("castore: put of %s entry abandoned at exit: %r", cache, exc)
            elif is_access_denied(exc):
                self._become_read_only(exc)  # reads go on: no circuit breaker, no warning
            else:
                self._trip(f"put to {self.config.url}", exc)

    def _become_read_only(self, exc: BaseException) -> None:
        """A write refused for want of permission: a fleet machine with read-only credentials. Reads go on; no
        further write is attempted by this process, and nothing is worth a warning."""
        if not self._read_only:
            self._read_only = True
            log.info("castore: %s refused a write (%s); this process is read-only from now on", self.config.url, exc)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued writes are done; False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.write_gate.hurry()  # nothing is held for a compile while a flush waits
        try:
            with self._pending_cv:
                while self._pending:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._pending_cv.wait(remaining)
            return True
        finally:
            self.write_gate.relax()

    def close(self, timeout: float | None = None) -> None:
        """Write the fetch plan, wait for queued writes (at most ``timeout``, default flush_timeout) and record the
        counters. Once. What is still queued then is reported in one warning and dropped."""
        if self._closed:
            return
        self._closed = True
        self._write_plan()
        try:
            if not self.flush(self.config.flush_timeout if timeout is None else timeout):
                self._abandon(f"flush_timeout={self.config.flush_timeout:g} s ran out")
        except KeyboardInterrupt:
            self._abandon("interrupted")
            raise
        if self._recorder is not None:
            if self._anchor is not None and self._plan:  # a fetch plan is stored (read, or written just now)
                self._recorder.note(self.namespace, self.plan_key(self._anchor))
            self._recorder.close()
        self.record_stats()

    def _abandon(self, why: str) -> None:
        """Stop uploading: drop what is queued, cancel what waits for the store's threads, and say what is lost.
        An upload already on the wire ends within its request timeouts (the store cannot cut it off)."""
        with self._pending_cv:
            self._abandoned = True
            left = {cache: n for cache, n in sorted(self._pending_by_cache.items()) if n > 0}
        store = self._store
        if store is not None and hasattr(store, "cancel_queued"):
            store.cancel_queued()
        entries = {cache: n for cache, n in left.items() if cache != DEFERRED}
        if entries:
            log.warning(
                "castore: %d entries not written to the store at exit (%s): %s; they are not stored",
                sum(entries.values()), ", ".join(f"{cache} {n}" for cache, n in entries.items()), why,
            )
        elif left:
            log.debug("castore: %d local copies not written at exit: %s", left.get(DEFERRED, 0), why)

    # -- stats across processes -----------------------------------------------------------------
    def record_stats(self) -> None:
        """Append this process's counters under the cache dir, for `castore stats`."""
        snapshot = self.stats.to_dict()
        if not any(c["hits"] or c["misses"] or c["puts"] for c in snapshot["caches"].values()):  # type: ignore[union-attr]
            return
        directory = os.path.join(self.config.cache_dir, "stats")
        try:
            os.makedirs(directory, exist_ok=True)
            record = {"time": time.time(), "pid": os.getpid(), "url": self.config.url, "namespace": self.namespace, **snapshot}
            with open(os.path.join(directory, f"{os.getpid()}-{time.time_ns()}.json"), "w") as f:
                json.dump(record, f)
        except OSError as exc:
            from castore import report_unusable_cache_dir

            report_unusable_cache_dir(self.config, exc)


def encode_plan(entries: list[tuple[str, str]]) -> bytes:
    return json.dumps({"v": PLAN_FORMAT, "entries": [list(e) for e in entries]}, separators=(",", ":")).encode()


def decode_plan(raw: bytes) -> list[tuple[str, str]]:
    """A stored plan's entries; an unreadable or newer plan is an empty one."""
    try:
        doc = json.loads(raw)
        if doc.get("v") != PLAN_FORMAT:
            return []
        entries = [(str(c), str(k)) for c, k in doc["entries"]]
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):  # RecursionError: deeply nested JSON
        return []
    return entries[:PLAN_LIMIT]
