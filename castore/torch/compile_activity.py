"""Background writes wait while torch.compile compiles in this process.

The first machine of a fleet compiles and writes at once: chunking, hashing, compressing and uploading its entries
(a C++ precompiled header alone is about 150 MB) compete with the compile for the CPU and the interpreter lock.
Held until the compile pauses, the same work runs after it: while the model runs, or at exit, where the session's
flush waits for it (flush_timeout). Dynamo reports each compile's start and end, lazy backward compiles included
(torch._dynamo.callback); the tuning of a Triton kernel at its first run counts as compiling too. A write is held
at most ``max_hold`` seconds, so a compile that never pauses still has its entries written.
"""

from __future__ import annotations

import logging
import threading
import time
from types import ModuleType
from typing import Any

from castore.torch.import_hooks import Patches

log = logging.getLogger("castore.torch")

# A backward compile starts a few milliseconds after the forward's ends (the forward runs in between), a recompile
# for a new input shape right after the first call: a pause this short is not the end of compiling.
SETTLE_SECONDS = 0.5
MAX_HOLD_SECONDS = 120.0


class WriteGate:
    """When background writes may run: no compile in progress for ``settle`` seconds, or ``max_hold`` seconds
    since the write was queued, or a flush is waiting for them."""

    def __init__(self, settle: float = SETTLE_SECONDS, max_hold: float = MAX_HOLD_SECONDS) -> None:
        self.settle = settle
        self.max_hold = max_hold
        self.reset()

    def reset(self) -> None:
        """No compile in progress, nothing held (also in a forked child: the parent's compile is not its own)."""
        self._cv = threading.Condition()
        self._compiling = 0
        self._last_end = float("-inf")
        self._hurry = 0  # flushes waiting: nothing is held meanwhile

    def compile_started(self, *_: Any) -> None:
        with self._cv:
            self._compiling += 1

    def compile_ended(self, *_: Any) -> None:
        with self._cv:
            self._compiling = max(0, self._compiling - 1)
            self._last_end = time.monotonic()
            self._cv.notify_all()

    def hurry(self) -> None:
        """A flush waits: let every write through until :meth:`relax`."""
        with self._cv:
            self._hurry += 1
            self._cv.notify_all()

    def relax(self) -> None:
        with self._cv:
            self._hurry = max(0, self._hurry - 1)

    def wait(self, queued_at: float) -> float:
        """Block until a write queued at ``queued_at`` (time.monotonic()) may run; returns the seconds waited."""
        started = time.monotonic()
        deadline = queued_at + self.max_hold
        with self._cv:
            while not self._hurry:
                now = time.monotonic()
                if now >= deadline:
                    break
                if self._compiling:
                    self._cv.wait(deadline - now)
                    continue
                quiet_for = now - self._last_end
                if quiet_for >= self.settle:
                    break
                self._cv.wait(min(self.settle - quiet_for, deadline - now))
        return time.monotonic() - started


def install(gate: WriteGate, patches: Patches) -> None:
    """Feed Dynamo's compile start and end callbacks to the gate, once torch._dynamo is imported, and hold writes
    while a Triton kernel is tuned at its first run."""

    def on_dynamo(dynamo: ModuleType) -> None:
        handler = getattr(dynamo, "callback_handler", None)
        if handler is None or not hasattr(handler, "register_start_callback"):
            log.debug("castore: this torch reports no compile start/end; writes are not held")
            return
        handler.register_start_callback(gate.compile_started)
        handler.register_end_callback(gate.compile_ended)
        patches.on_undo(lambda: _unregister(handler, gate))

    patches.on_import("torch._dynamo", on_dynamo)

    def on_triton_heuristics(th: ModuleType) -> None:
        cls = getattr(th, "CachingAutotuner", None)
        for name in RUNTIME_TUNING:
            current = getattr(cls, name, None) if cls is not None else None
            if current is not None:
                patches.replace(cls, name, _held_while(gate, current))

    patches.on_import("torch._inductor.runtime.triton_heuristics", on_triton_heuristics)


# A Triton kernel with several configs is benchmarked when it first runs, after Dynamo reported its compile's end:
# the writes that compile queued would otherwise run beside the benchmarks (the CPU, the interpreter lock).
RUNTIME_TUNING = ("autotune_to_one_config", "coordinate_descent_tuning")

_tuning = threading.local()


def tuning_in_this_thread() -> bool:
    """True inside a kernel's tuning (RUNTIME_TUNING) on this thread. A kernel is tuned only when no autotune
    result for it was found, so the candidate configs it compiles meanwhile were not published either."""
    return getattr(_tuning, "depth", 0) > 0


def _held_while(gate: WriteGate, method: Any) -> Any:
    def tuning(self: Any, *args: Any, **kwargs: Any) -> Any:
        gate.compile_started()
        _tuning.depth = getattr(_tuning, "depth", 0) + 1
        try:
            return method(self, *args, **kwargs)
        finally:
            _tuning.depth -= 1
            gate.compile_ended()

    tuning.__name__ = tuning.__qualname__ = getattr(method, "__name__", "tuning")
    return tuning


def _unregister(handler: Any, gate: WriteGate) -> None:
    for remove, callback in ((handler.remove_start_callback, gate.compile_started), (handler.remove_end_callback, gate.compile_ended)):
        try:
            remove(callback)
        except ValueError:
            pass
