"""Queue writes through a StoreSession and exit at once: what the interpreter's shutdown does to queued puts.

    python exit_after_put.py URL CACHE_DIR NAMESPACE CACHE:KEY:SIZE [CACHE:KEY:SIZE ...]

Settings come from CASTORE_* in the environment (flush_timeout, timeouts). No torch.
"""

from __future__ import annotations

import hashlib
import sys

from castore.config import load_config
from castore.torch.session import StoreSession


def payload(key: str, size: int) -> bytes:
    """Deterministic bytes, not compressible (the test recomputes them)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{key}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def main() -> None:
    url, cache_dir, namespace, *entries = sys.argv[1:]
    session = StoreSession(load_config({"url": url, "cache_dir": cache_dir}), namespace)
    for entry in entries:
        cache, key, size = entry.split(":")
        session.put(cache, key, payload(key, int(size)))
    # and exit right away: no flush, no close


if __name__ == "__main__":
    main()
