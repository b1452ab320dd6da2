"""Compile small graphs on CPU with castore installed (configured from CASTORE_* in the environment).

Run by tests/test_torch_trust.py in a process of its own. TRUST_GRAPHS names the graphs, in order (a, b, c: the
same input shape, different code). After each graph the script prints, flushed at once (a later graph may crash
the process on purpose):

    GRAPH <name> {"max_abs_diff": <vs eager>, "digest": ...}
    KEYS <name> [castore keys that appeared in the bucket during this graph]   (with TRUST_LIST_KEYS=1)

and at the end ``RESULT {castore.torch.stats()}``.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

import castore
import castore.torch

GRAPHS = {
    "a": lambda x: x * 2.0 + 1.0,
    "b": lambda x: x * 3.0 - 1.0,
    "c": lambda x: torch.sin(x) * 5.0 + x * x,
}

session = castore.torch.install()
listing = castore.open_store(config=castore.load_config({"cache_size": 0})) if os.environ.get("TRUST_LIST_KEYS") == "1" else None
namespace = castore.torch.default_namespace()


def bucket_keys() -> set[str]:
    assert listing is not None
    return {key for _, key, _ in listing.list(namespace)}


torch.manual_seed(0)
x = torch.randn(64, 64)
for name in os.environ["TRUST_GRAPHS"].split(","):
    before = bucket_keys() if listing else set()
    eager = GRAPHS[name](x)
    out = torch.compile(GRAPHS[name])(x)
    digest = hashlib.sha256(out.contiguous().numpy().tobytes()).hexdigest()[:24]
    print(f"GRAPH {name} " + json.dumps({"max_abs_diff": float((out - eager).abs().max()), "digest": digest}), flush=True)
    if listing:
        assert session.flush(60), "castore writes did not finish"
        print(f"KEYS {name} " + json.dumps(sorted(bucket_keys() - before)), flush=True)
assert session.flush(60)
print("RESULT " + json.dumps({"namespace": namespace, "stats": castore.torch.stats()}), flush=True)
