"""What a session counts: per cache (hits, misses, bytes, waits) and per process (layers, prefetches, time spent
opening the store or holding writes); ``castore.torch.stats()`` and ``castore stats`` show them."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    put_errors: int = 0
    get_errors: int = 0
    skipped: int = 0  # requests not made while the circuit breaker was open
    bytes_read: int = 0
    bytes_written: int = 0
    seconds_saved: float = 0.0  # compile time the hits' writers reported
    seconds_waited: float = 0.0  # time this process spent waiting on the store for gets


@dataclass
class SessionStats:
    caches: dict[str, CacheCounters] = field(default_factory=lambda: defaultdict(CacheCounters))
    local_hits: int = 0  # objects served by the node's local layer
    bucket_fetches: int = 0  # objects fetched from the bucket
    untrusted: int = 0  # entries refused by the trust policy (unsigned, wrongly signed, revoked, moved): misses
    prefetched: int = 0  # objects fetched ahead of their lookup, from a fetch plan
    install_seconds: float = 0.0  # castore.torch.install() in this process (hooks, and the torch modules they patch)
    store_open_seconds: float = 0.0  # opening the store (for s3://, the HTTP client and credentials)
    writes_held_seconds: float = 0.0  # time background writes waited for a compile to pause (compile_activity)
    source_keys: dict[str, str] = field(default_factory=dict)  # torch_key/triton_key: stored, thread, computed, set

    def to_dict(self) -> dict[str, object]:
        return {
            "caches": {name: asdict(c) for name, c in sorted(self.caches.items())},
            "layers": {"local": {"hits": self.local_hits}, "bucket": {"fetches": self.bucket_fetches}},
            "prefetched": self.prefetched,
            "untrusted": self.untrusted,
            "install_seconds": round(self.install_seconds, 3),
            "store_open_seconds": round(self.store_open_seconds, 3),
            "writes_held_seconds": round(self.writes_held_seconds, 3),
            "source_keys": dict(self.source_keys),
        }
