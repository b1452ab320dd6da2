"""castore's S3 client side by side with the earlier hand-written one and botocore; put/get throughput against
raw boto3 on the same S3 server; local-layer hit latency.

Starts its own SeaweedFS on 127.0.0.1 (castore.testing.seaweedfs). Sections (``--sections``, all by default):

* ``clients``: three S3 clients behind castore's Backend interface, interleaved in one run:
  ``obstore`` (castore.backends.s3, today's), ``handwritten`` (the SigV4 + urllib3 client castore had before,
  loaded at run time from git history, ``git show e2a473e:castore/backends/s3.py`` and sigv4.py, into a
  temporary package: castore itself holds no signer any more) and ``botocore`` (a boto3 client). For each:
  start-up CPU and wall time of a fresh process that opens the store and sends one HEAD (``--startup-runs``
  processes, medians, minus a process that only imports castore), then single-object put and get of 64 KiB to
  16 MiB (``--object-sizes``), medians of ``--reps``.
* ``throughput``: for each blob size and data kind, castore put / get through a Store with no local layer (S3
  direct, a fresh prefix per repetition so every put uploads every chunk), against boto3 ``upload_fileobj`` /
  ``download_fileobj`` (default TransferConfig: 8 MiB multipart, 10 threads) of the same bytes, interleaved.
* ``hits``: the latency of a local-layer hit (1 MiB and 64 KiB entries, median of --hits gets after the first).

Writes benchmarks/results/store_throughput.json and .png and prints markdown tables. Run it on a quiet machine,
from a git checkout (the ``handwritten`` client comes from its history)::

    .venv/bin/python benchmarks/store_throughput.py                       # everything (about 10 minutes)
    .venv/bin/python benchmarks/store_throughput.py --sections clients    # the three clients only
    .venv/bin/python benchmarks/store_throughput.py --quick               # 1, 4 MiB blobs; 64 KiB and 1 MiB objects
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import castore  # noqa: E402
from castore.backends.base import Backend, ObjectInfo  # noqa: E402
from castore.backends.s3 import S3Backend  # noqa: E402
from castore.store import Store  # noqa: E402
from castore.testing.seaweedfs import SeaweedFS  # noqa: E402

MiB = 1 << 20
RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
LEGACY_COMMIT = "e2a473e"  # the last commit with castore's own SigV4 client (castore/backends/s3.py + sigv4.py)
CLIENTS = ("obstore", "handwritten", "botocore")


# -- the three clients -------------------------------------------------------------------------------------
def legacy_package(into: Path) -> Path:
    """Write the hand-written client of LEGACY_COMMIT as package ``castore_legacy_s3`` under ``into``; return
    the directory to put on sys.path. Its own import of sigv4 is pointed at the package."""
    pkg = into / "castore_legacy_s3"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for name in ("s3.py", "sigv4.py"):
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{LEGACY_COMMIT}:castore/backends/{name}"],
                              check=True, capture_output=True, text=True).stdout  # fmt: skip
        (pkg / name).write_text(text.replace("from castore.backends import sigv4", "from castore_legacy_s3 import sigv4"))
    return into


class BotocoreBackend(Backend):
    """The same five requests through a boto3 client (standard retries, path-style addressing, no checksums)."""

    def __init__(self, url: str, *, max_concurrency: int = 16) -> None:
        import boto3
        import botocore.config
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(url)
        self.bucket, self.prefix = parts.netloc, parts.path.strip("/") + "/"
        endpoint = parse_qs(parts.query).get("endpoint", [None])[0]
        cfg = botocore.config.Config(connect_timeout=2, read_timeout=10, retries={"mode": "standard", "max_attempts": 4},
                                     s3={"addressing_style": "path"}, max_pool_connections=max_concurrency,
                                     request_checksum_calculation="when_required",
                                     response_checksum_validation="when_required")  # fmt: skip
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=cfg)
        self.url, self.max_concurrency = url, max_concurrency

    def get(self, path: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + path)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def put(self, path: str, data: bytes, *, if_absent: bool = False) -> bool:
        extra = {"IfNoneMatch": "*"} if if_absent else {}
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + path, Body=data, **extra)
        return True

    def head(self, path: str) -> ObjectInfo | None:
        r = self.client.head_object(Bucket=self.bucket, Key=self.prefix + path)
        return ObjectInfo(r["ContentLength"], r["ETag"].strip('"'))

    def exists(self, path: str) -> bool:
        return self.head(path) is not None

    def delete(self, path: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + path)

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        raise NotImplementedError

    def close(self) -> None:
        self.client.close()


# A fresh process: open the store, one HEAD. argv: client, url, key, legacy path.
_STARTUP = """
import sys, time
client, url, key, legacy = sys.argv[1:5]
sys.path.insert(0, legacy)
import castore
if client == "obstore":
    from castore.backends.s3 import S3Backend as B
    be = B(url)
elif client == "handwritten":
    from castore_legacy_s3.s3 import S3Backend as B
    be = B(url)
elif client == "botocore":
    sys.path.insert(0, sys.argv[5])
    from store_throughput import BotocoreBackend
    be = BotocoreBackend(url)
if client != "none":
    assert be.head(key) is not None
"""


def _run_child(args: list[str]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one child process, from its rusage."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _STARTUP, *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"start-up child {args[0]} exited {proc.returncode}")
    return usage.ru_utime + usage.ru_stime, wall


def open_client(name: str, url: str, workers: int) -> Backend:
    if name == "obstore":
        return S3Backend(url, max_concurrency=workers)
    if name == "handwritten":
        from castore_legacy_s3.s3 import S3Backend as LegacyS3Backend

        return LegacyS3Backend(url, max_concurrency=workers)
    return BotocoreBackend(url, max_concurrency=workers)


def bench_clients(sw: SeaweedFS, bucket: str, sizes: list[int], reps: int, startup_runs: int, legacy: Path,
                  workers: int) -> dict:  # fmt: skip
    url = sw.url(bucket, "clients")
    seed = S3Backend(url)
    seed.put("probe", b"x" * 100)
    startup: dict[str, dict[str, list[float]]] = {c: {"cpu": [], "wall": []} for c in ("none", *CLIENTS)}
    for _ in range(startup_runs):
        for client in ("none", *CLIENTS):  # interleaved, so a noisy moment hits every client alike
            cpu, wall = _run_child([client, url, "probe", str(legacy), str(Path(__file__).resolve().parent)])
            startup[client]["cpu"].append(cpu)
            startup[client]["wall"].append(wall)
    base = {k: statistics.median(v) for k, v in startup["none"].items()}
    start_rows = []
    for client in CLIENTS:
        med = {k: statistics.median(v) for k, v in startup[client].items()}
        start_rows.append({"client": client, "cpu_ms": round((med["cpu"] - base["cpu"]) * 1e3, 1),
                           "wall_ms": round((med["wall"] - base["wall"]) * 1e3, 1),
                           "cpu_s": [round(x, 4) for x in startup[client]["cpu"]],
                           "wall_s": [round(x, 4) for x in startup[client]["wall"]]})  # fmt: skip
        print(f"  start-up {client:>11}: +{start_rows[-1]['cpu_ms']} ms CPU, +{start_rows[-1]['wall_ms']} ms wall "
              f"(over a process that imports castore: {base['cpu'] * 1e3:.0f} ms CPU)", flush=True)  # fmt: skip
    backends = {c: open_client(c, url, workers) for c in CLIENTS}
    object_rows = []
    for size in sizes:
        data = os.urandom(size)
        t: dict[str, list[float]] = {f"{c}_{op}": [] for c in CLIENTS for op in ("put", "get")}
        for rep in range(reps):
            for client, be in backends.items():
                key = f"obj-{size}-{rep}-{client}"
                dt, _ = timed(lambda be=be, key=key: be.put(key, data))
                t[f"{client}_put"].append(dt)
                dt, got = timed(lambda be=be, key=key: be.get(key))
                assert got is not None and len(got) == size
                t[f"{client}_get"].append(dt)
        med = {k: statistics.median(v) for k, v in t.items()}
        row = {"size_kib": size >> 10, **{f"{k}_ms": round(v * 1e3, 2) for k, v in med.items()},
               "seconds": {k: [round(x, 5) for x in v] for k, v in t.items()}}  # fmt: skip
        object_rows.append(row)
        print("  object " + f"{size >> 10:>6} KiB: " + " | ".join(
            f"{c} put {row[f'{c}_put_ms']} get {row[f'{c}_get_ms']} ms" for c in CLIENTS), flush=True)
    for be in backends.values():
        be.close()
    return {"startup": start_rows, "startup_baseline_cpu_s": round(base["cpu"], 4), "objects": object_rows}


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


def markdown_clients(clients: dict) -> str:
    lines = ["| client | start-up CPU ms | start-up wall ms |", "|---|---:|---:|"]
    lines += [f"| {r['client']} | {r['cpu_ms']} | {r['wall_ms']} |" for r in clients["startup"]]
    lines += ["", "| object | " + " | ".join(f"{c} put ms | {c} get ms" for c in CLIENTS) + " |",
              "|---:|" + "---:|" * (2 * len(CLIENTS))]  # fmt: skip
    for r in clients["objects"]:
        lines.append(f"| {r['size_kib']} KiB | " + " | ".join(f"{r[f'{c}_put_ms']} | {r[f'{c}_get_ms']}" for c in CLIENTS) + " |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    parts = []
    if result.get("clients"):
        parts.append(markdown_clients(result["clients"]))
    if result.get("throughput"):
        lines = [
            "| data | size | chunks | stored/size | castore put MB/s | boto3 put MB/s | put ratio | castore get MB/s | boto3 get MB/s | get ratio |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["throughput"]:
            lines.append(
                f"| {r['kind']} | {r['size_mib']} MiB | {r['chunks']} | {r['stored_ratio']} | {r['castore_put_mbps']} | {r['boto3_put_mbps']} | "
                f"{r['put_ratio']}x | {r['castore_get_mbps']} | {r['boto3_get_mbps']} | {r['get_ratio']}x |"
            )
        parts.append("\n".join(lines))
    if result.get("local_hits"):
        lines = ["| local-layer hit | median ms | p90 ms |", "|---|---:|---:|"]
        for r in result["local_hits"]:
            lines.append(f"| {r['size_kib']} KiB | {r['median_ms']} | {r['p90_ms']} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


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


def _sizes(text: str) -> list[int]:
    units = {"K": 1 << 10, "M": MiB}
    return [int(t[:-1]) * units[t[-1].upper()] if t[-1].upper() in units else int(t) for t in text.split(",")]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="clients,throughput,hits", help="comma-separated: clients, throughput, hits")
    ap.add_argument("--sizes", default="1,4,16,64,256", help="blob sizes in MiB, comma-separated (throughput)")
    ap.add_argument("--object-sizes", default="64K,256K,1M,4M,16M", help="object sizes of the client comparison")
    ap.add_argument("--startup-runs", type=int, default=15, help="fresh processes per client for the start-up figures")
    ap.add_argument("--quick", action="store_true", help="1 and 4 MiB blobs; 64 KiB and 1 MiB objects")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--hits", type=int, default=100)
    ap.add_argument("--workers", type=int, default=16, help="castore thread pool / S3 connection pool size")
    ap.add_argument("--smoke", action="store_true", help="tiny run to check the harness works (figures meaningless)")
    ap.add_argument("--out", default=str(RESULTS / "store_throughput"), help="output path without extension")
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    if sections - {"clients", "throughput", "hits"}:
        ap.error(f"unknown sections {sorted(sections - {'clients', 'throughput', 'hits'})}")
    sizes = [1, 4] if args.quick else [int(s) for s in args.sizes.split(",")]
    object_sizes = [64 << 10, MiB] if args.quick else _sizes(args.object_sizes)
    if not args.smoke and (args.reps < 3 or args.hits < 50 or args.startup_runs < 5):
        ap.error("--reps >= 3, --hits >= 50 and --startup-runs >= 5 (or --smoke)")
    sizes_b = [s * MiB for s in sizes]
    corpus = _so_corpus(max(sizes_b) + 16 * MiB) if sections & {"throughput", "hits"} else b""
    with SeaweedFS(volume_size_mb=1024) as sw, tempfile.TemporaryDirectory(prefix="castore-legacy-") as tmp:
        for name, value in sw.env().items():
            os.environ[name] = value
        legacy = legacy_package(Path(tmp))
        sys.path.insert(0, str(legacy))
        bucket = sw.create_bucket("bench")
        t0 = time.time()
        clients = bench_clients(sw, bucket, object_sizes, args.reps, args.startup_runs, legacy, args.workers) if "clients" in sections else None
        throughput = bench_throughput(sw, bucket, sizes_b, args.reps, corpus, args.workers) if "throughput" in sections else []
        local_hits = bench_local_hits(sw, bucket, args.hits, corpus) if "hits" in sections else []
        result = {
            "benchmark": "store_throughput",
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(),
            "server": "SeaweedFS (weed server -s3) on 127.0.0.1, same machine as the client",
            "smoke": args.smoke,
            "method": {
                "reps": args.reps,
                "statistic": "median",
                "mb": "1e6 bytes",
                "clients": f"obstore = castore.backends.s3; handwritten = castore/backends/s3.py + sigv4.py of {LEGACY_COMMIT}; "
                           "botocore = a boto3 client (standard retries); start-up = a fresh process that opens the "
                           f"store and sends one HEAD, CPU (rusage) and wall, median of {args.startup_runs}, minus a "
                           "process that imports castore only; objects = one put then one get of random bytes",
                "castore": f"Store(S3Backend(url), no local layer), workers={args.workers}; fresh prefix per repetition",
                "boto3": "client.upload_fileobj / download_fileobj, default TransferConfig",
                "compressible": "real .so bytes from the venv (largest first)",
                "incompressible": "os.urandom",
                "local_hits": f"open_store with a LocalLayer; median of {args.hits} gets after the first",
                "ratio": "castore MB/s / boto3 MB/s",
            },
            "clients": clients,
            "throughput": throughput,
            "local_hits": local_hits,
            "elapsed_s": round(time.time() - t0, 1),
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    if throughput and local_hits:
        chart(result, out.with_suffix(".png"))
    print()
    print(markdown(result))
    print(f"\nwrote {out.with_suffix('.json')}")
    return result


if __name__ == "__main__":
    main()
