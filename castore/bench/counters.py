"""What a measured process counts beside its times: CPU seconds (its own, its threads' by name, its compile
workers'), Triton kernel compiles (ptxas runs) and PyTorch's autotuning calls.

Nothing here imports torch at module level: ``THREAD_CPU.install()`` must run before torch's import, where
castore's autoload starts its threads.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
import threading
import time
from typing import Any

PTXAS_COUNT_ENV = "CASTORE_PTXAS_COUNT_FILE"


def _real_ptxas() -> str | None:
    """The ptxas Triton would run: $TRITON_PTXAS_PATH, else the one bundled with Triton."""
    explicit = os.environ.get("TRITON_PTXAS_PATH")
    if explicit and os.access(explicit, os.X_OK):
        return explicit
    try:
        import importlib.util

        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    candidates = [os.path.join(root, "backends", "nvidia", "bin", "ptxas")]
    try:  # Triton >= 3.3 names it in its knobs
        from triton import knobs

        descriptor = type(knobs.nvidia).__dict__.get("ptxas")
        if descriptor is not None and getattr(descriptor, "default_path", None):
            candidates.insert(0, descriptor.default_path)
    except Exception:  # noqa: BLE001 - older Triton
        pass
    import shutil

    candidates.append(shutil.which("ptxas") or "")
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def install_ptxas_counter() -> str | None:
    """Point TRITON_PTXAS_PATH at a wrapper that appends a line per compile to $CASTORE_PTXAS_COUNT_FILE.

    Set in os.environ before Triton reads it, so Inductor's compile workers (subprocesses) inherit it.
    ``ptxas --version`` (Triton's version probe) is not counted. Returns the count file, or None.
    """
    real = _real_ptxas()
    if real is None:
        return None
    work = tempfile.mkdtemp(prefix="castore-ptxas-")
    count_file = os.environ.get(PTXAS_COUNT_ENV) or os.path.join(work, "ptxas.count")
    open(count_file, "a").close()
    wrapper = os.path.join(work, "ptxas")
    with open(wrapper, "w") as f:
        f.write(
            "#!/bin/sh\n"
            'case " $* " in *" --version "*) ;; *) echo "$$" >> "$' + PTXAS_COUNT_ENV + '" ;; esac\n'
            f'exec "{real}" "$@"\n'
        )
    os.chmod(wrapper, os.stat(wrapper).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.environ[PTXAS_COUNT_ENV] = count_file
    os.environ["TRITON_PTXAS_PATH"] = wrapper
    return count_file


class ThreadCpu:
    """CPU seconds of the threads this process started, by name with pool numbers dropped ("castore_3" and
    "castore_0" count as "castore"): the threads that share the interpreter lock with the main thread's tracing.
    A thread that has ended is counted when its run() returns, a live one from /proc (Linux; elsewhere it is left
    out). Counts threads started after install() whose class does not override run()."""

    def __init__(self) -> None:
        self._ended: dict[str, float] = {}
        self._lock = threading.Lock()

    def install(self) -> None:
        run = threading.Thread.run

        def counted_run(thread: threading.Thread) -> None:
            try:
                run(thread)
            finally:
                seconds = time.thread_time()
                with self._lock:
                    name = _thread_group(thread.name)
                    self._ended[name] = self._ended.get(name, 0.0) + seconds
                    # on the object: a later thread may get this one's ident, and it is listed until it exits
                    thread._cpu_counted = True  # type: ignore[attr-defined]

        threading.Thread.run = counted_run  # type: ignore[method-assign]

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            totals = dict(self._ended)
            live = [t for t in threading.enumerate() if not getattr(t, "_cpu_counted", False)]
        for thread in live:
            if thread is threading.main_thread() or thread.native_id is None:
                continue
            seconds = _task_cpu_seconds(thread.native_id)
            if seconds is not None:
                name = _thread_group(thread.name)
                totals[name] = totals.get(name, 0.0) + seconds
        return {name: round(seconds, 3) for name, seconds in sorted(totals.items())}


def _thread_group(name: str) -> str:
    return re.sub(r"[-_]\d+", "", name)


def _task_cpu_seconds(native_id: int) -> float | None:
    try:
        return _proc_stat(f"/proc/self/task/{native_id}/stat")[1]
    except (OSError, ValueError, IndexError):
        return None


def _proc_stat(path: str) -> tuple[str, float]:
    """(parent pid, CPU seconds: utime + stime) from a /proc/<pid>/stat or /proc/self/task/<tid>/stat file."""
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return fields[1], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


THREAD_CPU = ThreadCpu()


class GcTime:
    """Seconds the cyclic garbage collector ran in this process, per generation, and how often: a process that
    holds more objects (a client library's tables, a store's state) makes every full collection slower, and
    tracing a model allocates enough to run many. Timed through ``gc.callbacks`` from install() on."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.collections = [0, 0, 0]
        self._started: float | None = None

    def install(self) -> None:
        import gc

        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            generation = min(int(info.get("generation", 0)), 2)
            self.seconds[generation] += time.perf_counter() - self._started
            self.collections[generation] += 1
            self._started = None

    def snapshot(self, count_objects: bool = True) -> dict[str, Any]:
        """Totals so far; ``count_objects`` also counts the objects the collector tracks (a few ms per million:
        left out inside a timed phase)."""
        import gc

        totals: dict[str, Any] = {
            "seconds": round(sum(self.seconds), 3),
            "seconds_by_generation": [round(s, 3) for s in self.seconds],
            "collections": list(self.collections),
        }
        if count_objects:
            totals["tracked_objects"] = len(gc.get_objects())
        return totals


GC_TIME = GcTime()


def cpu_seconds() -> dict[str, Any]:
    """CPU seconds (user + system) used so far by this process, by the threads it started (``ThreadCpu``) and by
    its live descendants (Inductor's compile workers, which nobody waits for). Beside the wall times they tell
    added work from contention for the cores. Descendants are read from /proc (Linux); elsewhere None."""
    mine = os.times()
    descendants: float | None = None
    try:
        procs: dict[str, tuple[str, float]] = {}  # pid -> (parent pid, cpu seconds)
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                procs[pid] = _proc_stat(f"/proc/{pid}/stat")
            except OSError:
                continue  # exited meanwhile
        tree, descendants, grew = {str(os.getpid())}, 0.0, True
        while grew:  # a pool's workers are grandchildren
            new = {pid for pid, (parent, _) in procs.items() if parent in tree and pid not in tree}
            descendants += sum(procs[pid][1] for pid in new)
            tree |= new
            grew = bool(new)
    except (OSError, ValueError, IndexError):
        descendants = None
    main = time.thread_time() if threading.current_thread() is threading.main_thread() else None
    return {
        "self": round(mine.user + mine.system, 3),
        # the main thread's own: beside the named threads, the rest of "self" is native threads (CUDA's, a client
        # library's runtime)
        "main_thread": None if main is None else round(main, 3),
        "threads": THREAD_CPU.snapshot(),
        "descendants": None if descendants is None else round(descendants, 3),
    }


def count_lines(path: str | None) -> int | None:
    if not path:
        return None
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except OSError:
        return None


AUTOTUNE_ENTRY_POINTS = [
    ("torch._inductor.runtime.triton_heuristics", "CachingAutotuner", "benchmark_all_configs"),
    ("torch._inductor.runtime.coordinate_descent_tuner", "CoordescTuner", "autotune"),
    ("torch._inductor.select_algorithm", "AlgorithmSelectorCache", "autotune"),
    ("torch._inductor.select_algorithm", "AlgorithmSelectorCache", "benchmark_in_current_process"),
    ("torch._inductor.select_algorithm", "AlgorithmSelectorCache", "benchmark_in_sub_process"),
]


def install_autotune_counters() -> dict[str, int]:
    """Wrap PyTorch's autotuning entry points (those present in this version) with call counters, each when
    PyTorch imports its module: the measured process imports nothing it would not import on its own (a process
    that loads an ahead-of-time compiled function never imports select_algorithm, say)."""
    from castore.torch.import_hooks import when_imported

    counts: dict[str, int] = {}
    for module_name, cls_name, attr in AUTOTUNE_ENTRY_POINTS:
        when_imported(module_name, lambda module, cls_name=cls_name, attr=attr: _count_calls(module, cls_name, attr, counts))
    return counts


def _count_calls(module: Any, cls_name: str, attr: str, counts: dict[str, int]) -> None:
    import functools
    import inspect

    cls = getattr(module, cls_name, None)
    if cls is None:
        return
    try:
        raw = inspect.getattr_static(cls, attr)
    except AttributeError:
        return
    name = f"{cls_name}.{attr}"
    counts[name] = 0
    kind = classmethod if isinstance(raw, classmethod) else staticmethod if isinstance(raw, staticmethod) else None
    fn = raw.__func__ if kind else raw

    @functools.wraps(fn)
    def counted(*a: Any, **kw: Any) -> Any:
        counts[name] += 1
        return fn(*a, **kw)

    setattr(cls, attr, kind(counted) if kind else counted)
