"""Python's cyclic garbage collector held off while a stored function loads.

Loading an ahead-of-time compiled function is mostly imports (Dynamo, Inductor, Triton, the generated code) and
unpickling: hundreds of thousands of objects that all live on, and almost no cyclic garbage. Every few thousand
allocations the collector walks them anyway, and its full passes walk the whole heap: on a 2-core CPU a fifth of
the load's time went there (``gc`` in the benchmark's results). While paused, nothing is collected that reference
counting would not free; the collector runs again, on its usual thresholds, as soon as the load is done.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_holders = 0  # loads in progress that paused the collector
_was_enabled = False


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Disable the cyclic collector for the block; the last of concurrent blocks restores it. A collector the
    program disabled itself stays disabled."""
    global _holders, _was_enabled
    with _lock:
        if _holders == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _was_enabled:
                gc.enable()
