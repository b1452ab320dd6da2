"""castore put/get throughput against raw boto3 on the same S3 server, plus local-layer hit latency.

Starts its own SeaweedFS on 127.0.0.1 (castore.testing.seaweedfs). For each blob size and data kind:

* castore put / get through a Store with no local layer (S3 direct), a fresh bucket prefix per repetition
  so every put uploads every chunk (no dedup across repetitions);
* boto3 ``upload_fileobj`` / ``download_fileobj`` (default TransferConfig: 8 MiB multipart, 10 threads) of the
  same bytes to the same server, in the same run, interleaved with castore's repetitions.

Medians of --reps repetitions (>= 3). Then the latency of a local-layer hit (1 MiB and 64 KiB entries,
median of --hits gets after the first). Writes benchmarks/results/store_throughput.json and .png and prints a
markdown table::

    .venv/bin/python benchmarks/store_throughput.py            # 1, 4, 16, 64, 256 MiB
    .venv/bin/python benchmarks/store_throughput.py --quick    # 1, 4 MiB
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import castore  # noqa: E402
from castore.backends.s3 import S3Backend  # noqa: E402
from castore.store import Store  # noqa: E402
from castore.testing.seaweedfs import SeaweedFS  # noqa: E402

MiB = 1 << 20
RESULTS = Path(__file__).resolve().parent / "results"


# -- data ------------------------------------------------------------------------------------------------
def _so_corpus(limit: int) -> bytes:
    """Real shared-library bytes (what torch.compile stores most), largest files first, no repetition."""
    files = sorted(glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages", "**", "*.so*"), recursive=True),
                   key=lambda p: -os.path.getsize(p))
    out = bytearray()
    for path in files:
        if len(out) >= limit:
            break
        with open(path, "rb") as f:
            out += f.read(limit - len(out))
    return bytes(out)


def _text(size: int, seed: int) -> bytes:
    import random

    rnd = random.Random(seed)
    words = [b"def", b"return", b"tmp", b"buf", b"kernel", b"tl.load", b"tl.store", b"xindex", b"=", b"+", b"*", b"(", b")"]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rnd.choice(words) + b"%d" % rnd.randrange(1000) for _ in range(12)) + b"\n"
    return bytes(out[:size])


def make_data(kind: str, size: int, corpus: bytes) -> bytes:
    if kind == "incompressible":
        return os.urandom(size)
    if len(corpus) >= size:
        return corpus[:size]
    return corpus + _text(size - len(corpus), size)


# -- timing ----------------------------------------------------------------------------------------------
def timed(fn) -> tuple[float, object]:  # noqa: ANN001
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def mbps(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def bench_throughput(sw: SeaweedFS, bucket: str, sizes: list[int], reps: int, corpus: bytes, workers: int) -> list[dict]:
    client = sw.client(max_pool_connections=32)
    rows = []
    for kind in ("compressible", "incompressible"):
        for size in sizes:
            data = make_data(kind, size, corpus)
            t = {"castore_put": [], "castore_get": [], "boto3_put": [], "boto3_get": []}
            stored = 0
            for rep in range(reps):
                prefix = f"{kind}-{size}-r{rep}-{os.urandom(3).hex()}"
                with Store(S3Backend(sw.url(bucket, prefix), max_concurrency=workers)) as store:
                    dt, result = timed(lambda: store.put("bench", "blob", data))
                    assert result.published and result.chunks_uploaded == result.chunks_total
                    stored = result.manifest.stored_size
                    t["castore_put"].append(dt)
                    dt, got = timed(lambda: store.get("bench", "blob"))
                    assert got is not None and len(got) == size
                    t["castore_get"].append(dt)
                    chunks = len(result.manifest.chunks)
                del got
                key = f"raw/{prefix}"
                dt, _ = timed(lambda: client.upload_fileobj(io.BytesIO(data), bucket, key))
                t["boto3_put"].append(dt)
                buf = io.BytesIO()
                dt, _ = timed(lambda: client.download_fileobj(bucket, key, buf))
                assert buf.getbuffer().nbytes == size
                t["boto3_get"].append(dt)
                del buf
            med = {k: statistics.median(v) for k, v in t.items()}
            row = {
                "kind": kind,
                "size_mib": size // MiB,
                "chunks": chunks,
                "stored_ratio": round(stored / size, 3),
                **{f"{k}_mbps": round(mbps(size, v), 1) for k, v in med.items()},
                "get_ratio": round(med["boto3_get"] / med["castore_get"], 3),
                "put_ratio": round(med["boto3_put"] / med["castore_put"], 3),
                "seconds": {k: [round(x, 4) for x in v] for k, v in t.items()},
            }
            rows.append(row)
            print(f"  {kind:>14} {size // MiB:>4} MiB: castore put {row['castore_put_mbps']:>7} get {row['castore_get_mbps']:>7} | "
                  f"boto3 put {row['boto3_put_mbps']:>7} get {row['boto3_get_mbps']:>7} MB/s", flush=True)
    client.close()
    return rows


def bench_local_hits(sw: SeaweedFS, bucket: str, hits: int, corpus: bytes) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="castore-bench-layer-") as layer:
        with castore.open_store(sw.url(bucket, "local-hit"), cache_dir=layer, cache_size=1 << 30) as store:
            assert store.local is not None
            for size in (1 * MiB, 64 << 10):
                data = make_data("compressible", size, corpus[8 * MiB :])  # not the bytes of the throughput runs
                store.put("bench", f"hit-{size}", data)
                assert store.get("bench", f"hit-{size}") == data  # the first get
                misses = store.local.stats.misses
                lat = []
                for _ in range(hits):
                    dt, got = timed(lambda: store.get("bench", f"hit-{size}"))  # noqa: B023
                    lat.append(dt)
                assert got == data and store.local.stats.misses == misses, "a hit went to the bucket"
                rows.append({
                    "size_kib": size >> 10,
                    "gets": hits,
                    "median_ms": round(statistics.median(lat) * 1e3, 3),
                    "p90_ms": round(sorted(lat)[int(0.9 * len(lat))] * 1e3, 3),
                    "min_ms": round(min(lat) * 1e3, 3),
                })
                print(f"  local hit {size >> 10:>5} KiB: median {rows[-1]['median_ms']} ms (p90 {rows[-1]['p90_ms']} ms)", flush=True)
    return rows


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor(),
        "castore": castore.__version__,
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        info["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1)
    except (ValueError, OSError):
        pass
    import boto3

    info["boto3"] = boto3.__version__
    return info


def markdown(result: dict) -> str:
    lines = [
        "| data | size | chunks | stored/size | castore put MB/s | boto3 put MB/s | put ratio | castore get MB/s | boto3 get MB/s | get ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["throughput"]:
        lines.append(
            f"| {r['kind']} | {r['size_mib']} MiB | {r['chunks']} | {r['stored_ratio']} | {r['castore_put_mbps']} | {r['boto3_put_mbps']} | "
            f"{r['put_ratio']}x | {r['castore_get_mbps']} | {r['boto3_get_mbps']} | {r['get_ratio']}x |"
        )
    lines += ["", "| local-layer hit | median ms | p90 ms |", "|---|---:|---:|"]
    for r in result["local_hits"]:
        lines.append(f"| {r['size_kib']} KiB | {r['median_ms']} | {r['p90_ms']} |")
    return "\n".join(lines)


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, kind in zip(axes, ("compressible", "incompressible")):
        rows = [r for r in result["throughput"] if r["kind"] == kind]
        sizes = [r["size_mib"] for r in rows]
        for series, style in (("castore_get", "o-"), ("boto3_get", "o--"), ("castore_put", "s-"), ("boto3_put", "s--")):
            ax.plot(sizes, [r[f"{series}_mbps"] for r in rows], style, label=series.replace("_", " "))
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [f"{s} MiB" for s in sizes])
        ax.set_ylabel("MB/s (median)")
        ax.set_title(f"{kind} blobs, SeaweedFS on 127.0.0.1")
        ax.grid(True, alpha=0.3)
        ax.legend()
    m = result["machine"]
    hits = ", ".join(f"{r['size_kib']} KiB hit {r['median_ms']} ms" for r in result["local_hits"])
    fig.suptitle(f"castore vs boto3 — {m['cpu_count']} CPUs, {m.get('cpu_model', m['platform'])} — local layer: {hits}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4,16,64,256", help="blob sizes in MiB, comma-separated")
    ap.add_argument("--quick", action="store_true", help="1 and 4 MiB only")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hits", type=int, default=100)
    ap.add_argument("--workers", type=int, default=16, help="castore thread pool / S3 connection pool size")
    ap.add_argument("--out", default=str(RESULTS / "store_throughput"), help="output path without extension")
    args = ap.parse_args(argv)
    sizes = [1, 4] if args.quick else [int(s) for s in args.sizes.split(",")]
    if args.reps < 3 or args.hits < 50:
        ap.error("--reps >= 3 and --hits >= 50")
    sizes_b = [s * MiB for s in sizes]
    corpus = _so_corpus(max(sizes_b) + 16 * MiB)
    print(f"data: {len(corpus) / MiB:.0f} MiB of .so bytes from {sys.prefix} for the compressible kind", flush=True)
    with SeaweedFS(volume_size_mb=1024) as sw:
        for name, value in sw.env().items():
            os.environ[name] = value
        bucket = sw.create_bucket("bench")
        t0 = time.time()
        throughput = bench_throughput(sw, bucket, sizes_b, args.reps, corpus, args.workers)
        local_hits = bench_local_hits(sw, bucket, args.hits, corpus)
        result = {
            "benchmark": "store_throughput",
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(),
            "server": "SeaweedFS (weed server -s3) on 127.0.0.1, same machine as the client",
            "method": {
                "reps": args.reps,
                "statistic": "median",
                "mb": "1e6 bytes",
                "castore": f"Store(S3Backend(url), no local layer), workers={args.workers}; fresh prefix per repetition",
                "boto3": "client.upload_fileobj / download_fileobj, default TransferConfig",
                "compressible": "real .so bytes from the venv (largest first)",
                "incompressible": "os.urandom",
                "local_hits": f"open_store with a LocalLayer; median of {args.hits} gets after the first",
                "ratio": "castore MB/s / boto3 MB/s",
            },
            "throughput": throughput,
            "local_hits": local_hits,
            "elapsed_s": round(time.time() - t0, 1),
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    chart(result, out.with_suffix(".png"))
    print()
    print(markdown(result))
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
