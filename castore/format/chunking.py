"""Content-defined chunking (FastCDC 2020, via pyfastcdc).

Three size classes, chosen by measurement (benchmarks/store_throughput.py, benchmarks/hot_load.py --dedup):
- under 1 MiB (kernels, autotune entries, small graphs): near 64 KiB, so related artifacts share chunks;
- 1 to 32 MiB (FX graph entries with their Triton bundles, precompiled headers): near 512 KiB. At 64 KiB an
  8 MiB entry was ~130 requests and ran at a quarter of one boto3 download, while the dedup measured between
  variants of one model was 1.00x at 64 KiB: small chunks bought nothing for these entries;
- 32 MiB and up (bundles): near 4 MiB, so a 256 MiB blob is ~64 requests, not 4096 (at 1 MiB, per-request
  overhead held a get of 256 MiB to ~0.7x of one boto3 download_fileobj; at 4 MiB it is ~0.9x).
The parameters are written into each manifest, so readers never need to know this policy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from pyfastcdc import FastCDC

ALGORITHM = "fastcdc2020"
# Hard bound a reader accepts for one chunk; writers stay far below it.
MAX_CHUNK_SIZE = 16 << 20


@dataclass(frozen=True)
class ChunkerParams:
    min_size: int
    avg_size: int
    max_size: int
    algorithm: str = ALGORITHM

    def to_wire(self) -> dict[str, object]:
        return {"algo": self.algorithm, "min": self.min_size, "avg": self.avg_size, "max": self.max_size}


SMALL = ChunkerParams(min_size=16 << 10, avg_size=64 << 10, max_size=256 << 10)
MEDIUM = ChunkerParams(min_size=128 << 10, avg_size=512 << 10, max_size=2 << 20)
LARGE = ChunkerParams(min_size=1 << 20, avg_size=4 << 20, max_size=8 << 20)  # pyfastcdc: min <= 1 MiB
# Blobs at least this large use MEDIUM / LARGE.
MEDIUM_BLOB_THRESHOLD = 1 << 20
LARGE_BLOB_THRESHOLD = 32 << 20


def params_for_size(size: int) -> ChunkerParams:
    if size >= LARGE_BLOB_THRESHOLD:
        return LARGE
    return MEDIUM if size >= MEDIUM_BLOB_THRESHOLD else SMALL


@lru_cache(maxsize=8)
def _chunker(params: ChunkerParams) -> FastCDC:
    # pyfastcdc's avg_size is the mean *after* the min-size skip; pass avg - min so the mean is avg.
    return FastCDC(avg_size=params.avg_size - params.min_size, min_size=params.min_size, max_size=params.max_size)


def cut(data: bytes | bytearray | memoryview, params: ChunkerParams | None = None) -> Iterator[memoryview]:
    """Yield consecutive views of ``data`` whose concatenation is ``data``."""
    view = memoryview(data).cast("B")
    if params is None:
        params = params_for_size(len(view))
    if len(view) <= params.min_size:
        if len(view):
            yield view
        return
    for chunk in _chunker(params).cut_buf(view):
        yield view[chunk.offset : chunk.offset + chunk.length]
