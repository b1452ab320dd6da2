"""Python's cyclic garbage collector held off while a stored function loads.

Loading an ahead-of-time compiled function is mostly imports (Dynamo, Inductor, Triton, the generated code) and
unpickling: hundreds of thousands of objects that all live on, and almost no cyclic garbage. Every few thousand
allocations the collector walks them anyway, and its full passes walk the whole heap: on a 2-core CPU a fifth of
the load's time went there (``gc`` in the benchmark's results). While paused, nothing is collected that reference
counting would not free; the collector runs again, on its usual thresholds, as soon as the load is done.

What the load made is then moved into the oldest generation without a walk (``gc.freeze()`` then
``gc.unfreeze()``, which puts the frozen objects back into the oldest generation): otherwise the first young
collection after the pause walks every object of the load, and the next middle ones again (0.1 s of a small
model's first call on an H200). They stay collectable: a full collection finds their garbage, as it finds any
old object's.
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
                _promote_young_objects()
                gc.enable()


def _promote_young_objects() -> None:
    """Every tracked object into the oldest generation, in constant time. Not where the program has frozen
    objects itself (a server that forks, for copy-on-write): gc.unfreeze() would undo that."""
    if gc.get_freeze_count() == 0:
        gc.freeze()
        gc.unfreeze()
