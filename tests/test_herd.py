"""A thundering herd on one node: processes started at once, sharing the node's local layer, fetch each object
from the bucket once (SeaweedFS behind a recording proxy). The torch-level herd is benchmarks/herd.py."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import castore
from castore.testing.faultproxy import FaultProxy

pytestmark = pytest.mark.s3

PROCESSES = int(os.environ.get("CASTORE_HERD_PROCESSES", "4"))

_READER = r"""
import hashlib, json, sys, time
import castore
url, cache_dir, start_at, wanted = sys.argv[1], sys.argv[2], float(sys.argv[3]), json.loads(sys.argv[4])
store = castore.open_store(url, cache_dir=cache_dir, cache_size=1 << 30)
time.sleep(max(0.0, start_at - time.time()))   # every process starts its gets at the same moment
bad = [k for k, digest in wanted.items() if hashlib.sha256(store.get("herd", k) or b"-").hexdigest() != digest]
print(json.dumps({"bad": bad, "local": store.stats_dict()}))
store.close()
"""


def test_a_herd_on_one_node_fetches_each_object_from_the_bucket_once(seaweedfs, s3_bucket: str, s3_url: str, s3_env, tmp_path: Path) -> None:  # noqa: ANN001
    rng = random.Random(7)
    blobs = {f"k{i}": rng.randbytes(rng.choice([3_000, 150_000, 600_000])) for i in range(12)}
    with castore.open_store(s3_url, cache_size=0) as store:  # populated directly, not through the proxy
        for key, blob in blobs.items():
            store.put("herd", key, blob)
        objects = {p for p, _ in store.backend.list("castore/v1/")}
    wanted = {k: hashlib.sha256(b).hexdigest() for k, b in blobs.items()}

    with FaultProxy(seaweedfs.endpoint, record=True) as proxy:
        url = seaweedfs.url(s3_bucket, "prefix").replace(seaweedfs.endpoint, proxy.endpoint)
        start_at = time.time() + 3.0  # after every interpreter has started
        env = dict(s3_env, PYTHONPATH=str(Path(castore.__file__).parent.parent))
        procs = [
            subprocess.Popen([sys.executable, "-c", _READER, url, str(tmp_path / "node-layer"), str(start_at), json.dumps(wanted)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(PROCESSES)
        ]
        results = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
        seen = list(proxy.seen)

    assert all(r["bad"] == [] for r in results), results
    requests = Counter((r.method, r.target.split("?", 1)[0]) for r in seen)
    gets = Counter(target for (method, target), n in requests.items() for _ in range(n) if method == "GET")
    assert all(method == "GET" for method, _ in requests), requests  # no HEAD, LIST or PUT on the read path
    fetched = {t.split("/prefix/", 1)[1] for t in gets}
    assert fetched == objects  # every manifest and chunk object...
    assert max(gets.values()) == 1, [t for t, n in gets.items() if n > 1]  # ...fetched once by the whole node
    assert sum(r["local"]["local_misses"] for r in results) == len(objects)
    assert sum(r["local"]["local_hits"] for r in results) == len(objects) * (PROCESSES - 1)
