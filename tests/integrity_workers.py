"""Process bodies of the reliability trials (a module of their own so forkserver children import it by name)."""

from __future__ import annotations

import hashlib
import os
import random
import traceback


def content(seed: int, size: int) -> bytes:
    """Deterministic bytes built from a small pool of segments, so different entries share chunks."""
    rnd = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        segment = rnd.randrange(12)
        out += random.Random(segment).randbytes(48 << 10) + b"%d" % rnd.randrange(1 << 30)
    return bytes(out[:size])


def entry_size(seed: int) -> int:
    return random.Random(seed).choice([900, 12_000, 90_000, 400_000, 1_500_000])


def writer(url: str, env: dict[str, str], cache_dir: str, jobs: list[tuple[str, str, int]]) -> None:
    """Put each (namespace, key, seed) entry; the parent kills this process at a random moment."""
    os.environ.update(env)
    import castore

    store = castore.open_store(url, cache_dir=cache_dir, cache_size=1 << 30, workers=4)
    for namespace, key, seed in jobs:
        store.put(namespace, key, content(seed, entry_size(seed)))
    store.close()
    os._exit(0)


def racer(index: int, root: str, layer_dir: str, bound: int, keys: int, ops: int, results) -> None:  # noqa: ANN001
    """Read and write overlapping keys through one shared local layer; report wrong bytes (never expected)."""
    try:
        from castore.backends.file import FileBackend
        from castore.local_layer import LocalLayer
        from castore.store import Store

        store = Store(LocalLayer(FileBackend(root), layer_dir, bound), workers=4)
        rnd = random.Random(index)
        wrong = reads = hits = writes = 0
        for _ in range(ops):
            k = rnd.randrange(keys)
            expected = content(1000 + k, 20_000 + (k % 7) * 37_000)
            if rnd.random() < 0.3:
                store.put("race", f"k{k}", expected)
                writes += 1
            else:
                got = store.get("race", f"k{k}")
                reads += 1
                if got is not None:
                    hits += 1
                    if hashlib.sha256(got).digest() != hashlib.sha256(expected).digest():
                        wrong += 1
        store.close()
        results.put({"i": index, "wrong": wrong, "reads": reads, "hits": hits, "writes": writes})
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put({"i": index, "error": traceback.format_exc()})
