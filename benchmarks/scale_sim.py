"""10,000 nodes start one job at once: what the bucket sees, with and without packed bundles (docs/SCALE.md).

A seeded discrete-event simulation. Each node fetches what a fresh castore machine needs before it runs warm:

- without packing, one GET per object: the job's fetch plan, then every manifest of the closure, then every
  chunk (in parallel, ``--connections`` at a time, as castore's prefetch does);
- with a packed bundle (CASTORE_BUNDLE or `castore pull`), a LIST of the bundle's versions (none when the version
  is pinned, NAME@N), a GET of the bundle manifest, then one ranged GET per run of the pack plan.

S3 answers at most ``--get-rate`` GET/HEAD/LIST requests per second per partition (5,500, AWS's published
figure; token bucket, one second of burst) and 503 SlowDown beyond; S3 splitting a hot prefix into more
partitions over minutes is not modelled: either the bucket is one partition (a new bucket, or one whose load
never warranted a split) or every object prefix (``chunks/<hh>/``, ``packs/<hh>/``, ``manifests/<ns>/``) is
already a partition of its own. A throttled request is retried as castore does: a lookup as the S3 backend does
(full jitter, base 0.5 s, doubling, capped at 20 s, 4 attempts in all); a bundle read ("patient") for up to 6
rounds of those, with full-jitter waits of 1 s doubling between rounds (castore.bundles.patiently). A request
that runs out of attempts leaves its node degraded (that node compiles what it could not fetch). A request
takes ``--latency`` plus its bytes at ``--conn-mbps``.

    python benchmarks/scale_sim.py                         # all scenarios, results in benchmarks/results/scale/
    python benchmarks/scale_sim.py --nodes 200 --no-plot   # a smoke run
    python benchmarks/scale_sim.py --profile-from s3://bucket/prefix t   # measure a real bundle's objects
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "scale"
PROFILE = RESULTS / "transformer_bundle_profile.json"
GET_RATE = 5500.0  # S3: GET/HEAD per second per partitioned prefix
PUT_RATE = 3500.0  # S3: PUT/COPY/POST/DELETE per second per partitioned prefix (writers: one CI job here)
THROTTLED_BASE = 0.5  # castore.backends.s3: first backoff after 503 SlowDown
MAX_BACKOFF = 20.0
MAX_ATTEMPTS = 4  # castore's default max_attempts
PATIENT_ROUNDS, PATIENT_BASE = 6, 1.0  # castore.bundles: rounds of the backend's attempts, for bundle reads
SLOWDOWN_LATENCY = 0.010  # seconds for a 503 to come back


# -- workload: what one node fetches ---------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    partition: str  # the object prefix S3 would partition on
    size: int


def phases_for(profile: dict[str, Any], *, packed: bool, pinned: bool) -> list[list[Request]]:
    """The requests of one node, in phases: each phase starts when the one before it is done."""
    if packed:
        phases = [] if pinned else [[Request("manifests/bundles", 2000)]]
        phases.append([Request("manifests/bundles", profile["bundle_manifest_bytes"])])
        phases.append([Request("packs/" + profile["pack_prefix"], n) for n in profile["pack_reads"]])
        return phases
    return [
        [Request("manifests/" + profile["namespace"], 2000)],  # the fetch plan
        [Request("manifests/" + profile["namespace"], n) for n in profile["manifests"]],
        [Request("chunks/" + hh, n) for hh, n in profile["chunks"]],
    ]


# -- the simulation --------------------------------------------------------------------------------------
@dataclass
class Partition:
    rate: float
    tokens: float
    last: float = 0.0

    def admit(self, now: float) -> bool:
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class Node:
    phases: list[list[Request]]
    start: float
    phase: int = 0
    queue: list[Request] = field(default_factory=list)
    in_flight: int = 0
    failed: int = 0
    done_at: float | None = None


@dataclass
class Scenario:
    name: str
    packed: bool
    split_prefixes: bool
    jitter: float  # nodes start uniformly over [0, jitter] seconds
    pinned: bool = False
    patient: bool = False  # bundle reads' retry rounds (castore.bundles.patiently)


def simulate(profile: dict[str, Any], sc: Scenario, *, nodes: int, connections: int, latency: float,
             conn_mbps: float, get_rate: float, seed: int) -> dict[str, Any]:  # fmt: skip
    rng = random.Random(seed)
    partitions: dict[str, Partition] = {}

    def partition(name: str) -> Partition:
        key = name if sc.split_prefixes else "bucket"
        p = partitions.get(key)
        if p is None:
            p = partitions[key] = Partition(get_rate, get_rate)
        return p

    per_node = phases_for(profile, packed=sc.packed, pinned=sc.pinned)
    fleet = [Node(per_node, rng.uniform(0, sc.jitter) if sc.jitter else 0.0) for _ in range(nodes)]
    events: list[tuple[float, int, int, int, Request | None, int]] = []  # (time, seq, kind, node, request, attempt)
    seq = 0
    ARRIVE, DONE, SLOW, START = 0, 1, 2, 3
    counts = {"requests": 0, "slowdowns": 0, "failed": 0}
    per_second: dict[int, int] = {}

    def push(t: float, kind: int, n: int, req: Request | None = None, attempt: int = 1) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, n, req, attempt))

    def pump(n: int, now: float) -> None:
        node = fleet[n]
        while node.queue and node.in_flight < connections:
            node.in_flight += 1
            push(now, ARRIVE, n, node.queue.pop(), 1)
        if not node.queue and node.in_flight == 0:
            node.phase += 1
            if node.phase < len(node.phases):
                node.queue = list(node.phases[node.phase])
                pump(n, now)
            else:
                node.done_at = now

    for n, node in enumerate(fleet):
        push(node.start, START, n)
    while events:
        now, _, kind, n, req, attempt = heapq.heappop(events)
        node = fleet[n]
        if kind == START:
            node.queue = list(node.phases[0])
            pump(n, now)
        elif kind == ARRIVE:
            assert req is not None
            counts["requests"] += 1
            per_second[int(now)] = per_second.get(int(now), 0) + 1
            if partition(req.partition).admit(now):
                push(now + latency + req.size / (conn_mbps * 1e6), DONE, n, req, attempt)
            else:
                counts["slowdowns"] += 1
                push(now + SLOWDOWN_LATENCY, SLOW, n, req, attempt)
        elif kind == SLOW:
            assert req is not None
            rounds = PATIENT_ROUNDS if sc.patient else 1
            if attempt < MAX_ATTEMPTS * rounds:
                if attempt % MAX_ATTEMPTS:  # the backend's own retries
                    delay = min(MAX_BACKOFF, rng.random() * THROTTLED_BASE * 2 ** (attempt % MAX_ATTEMPTS - 1))
                else:  # a round of them failed: the bundle reader waits, then tries another round
                    delay = min(MAX_BACKOFF, rng.random() * PATIENT_BASE * 2 ** (attempt // MAX_ATTEMPTS - 1))
                push(now + delay, ARRIVE, n, req, attempt + 1)
            else:
                counts["failed"] += 1
                node.failed += 1
                node.in_flight -= 1
                pump(n, now)
        else:  # DONE
            node.in_flight -= 1
            pump(n, now)
    warm = sorted(node.done_at - node.start for node in fleet if not node.failed and node.done_at is not None)
    finished = max(node.done_at for node in fleet if node.done_at is not None)

    def pct(q: float) -> float | None:
        return round(warm[min(len(warm) - 1, int(q * len(warm)))], 2) if warm else None

    return {
        "scenario": sc.name,
        "packed": sc.packed,
        "split_prefixes": sc.split_prefixes,
        "jitter_s": sc.jitter,
        "pinned_version": sc.pinned,
        "patient_retries": sc.patient,
        "nodes": nodes,
        "requests_per_node": sum(len(p) for p in per_node),
        "bytes_per_node": sum(r.size for p in per_node for r in p),
        "requests_sent": counts["requests"],
        "slowdowns_503": counts["slowdowns"],
        "requests_failed": counts["failed"],
        "nodes_degraded": sum(1 for node in fleet if node.failed),
        "warm_seconds_p50": pct(0.5),
        "warm_seconds_p99": pct(0.99),
        "warm_seconds_max": round(warm[-1], 2) if warm else None,
        "all_done_seconds": round(finished, 2),
        "peak_requests_per_second": max(per_second.values()),
    }


SCENARIOS = [
    Scenario("per-object, one partition", packed=False, split_prefixes=False, jitter=0.0),
    Scenario("per-object, prefixes split", packed=False, split_prefixes=True, jitter=0.0),
    Scenario("per-object, one partition, 60 s jitter", packed=False, split_prefixes=False, jitter=60.0),
    Scenario("per-object, prefixes split, 60 s jitter", packed=False, split_prefixes=True, jitter=60.0),
    Scenario("packed, one partition, lookup retries", packed=True, split_prefixes=False, jitter=0.0),
    Scenario("packed, one partition", packed=True, split_prefixes=False, jitter=0.0, patient=True),
    Scenario("packed, prefixes split", packed=True, split_prefixes=True, jitter=0.0, patient=True),
    Scenario("packed, one partition, pinned NAME@N", packed=True, split_prefixes=False, jitter=0.0, pinned=True, patient=True),
    Scenario("packed, one partition, 10 s jitter", packed=True, split_prefixes=False, jitter=10.0, patient=True),
]


# -- a real bundle's profile -----------------------------------------------------------------------------
def profile_from_store(url: str, ref: str) -> dict[str, Any]:
    """What a node fetches for a published bundle: object sizes and prefixes, and the pack reads."""
    import castore
    from castore import bundles

    with castore.open_store(url, cache_size=0) as store:
        b = bundles.open_bundle(store, ref)
    wanted = [bundles._Wanted(m.path, m.where, lambda _: None) for m in b.index.manifests]
    wanted += [bundles._Wanted(c.path, c.where, lambda _: None) for c in b.index.chunks]
    runs = bundles.plan_reads(wanted)
    namespaces = sorted({m.namespace for m in b.index.manifests})
    return {
        "bundle": f"{b.name}@{b.version}",
        "namespace": namespaces[0],
        "manifests": [m.where.length for m in b.index.manifests],
        "chunks": [[c.digest.hex()[:2], c.where.length] for c in b.index.chunks],
        "bundle_manifest_bytes": len(b.manifest.to_bytes()),
        "pack_prefix": b.index.packs[0][0].hex()[:2],
        "pack_reads": [max(w.where.offset + w.where.length for w in run) - run[0].where.offset for run in runs],
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    names = [r["scenario"] for r in results]
    colors = ["tab:red" if not r["packed"] else "tab:green" for r in results]
    y = range(len(results))
    axes[0].barh(y, [r["requests_sent"] for r in results], color=colors)
    axes[0].set_title("requests sent to the bucket (retries included)")
    axes[1].barh(y, [r["slowdowns_503"] for r in results], color=colors)
    axes[1].set_title("503 SlowDown answers")
    axes[2].barh(y, [r["warm_seconds_p99"] or 0 for r in results], color=colors)
    axes[2].set_title("p99 seconds until a node is warm")
    for i, r in enumerate(results):
        if r["nodes_degraded"]:
            axes[2].text(r["warm_seconds_p99"] or 0, i, f"  {r['nodes_degraded']} nodes degraded", va="center", fontsize=8)
    for ax in axes:
        ax.set_yticks(list(y))
        ax.set_yticklabels(names if ax is axes[0] else [], fontsize=8)
        ax.invert_yaxis()
    axes[0].set_xscale("log")
    axes[1].set_xscale("symlog")
    axes[2].set_xlabel("seconds (nodes that fetched everything)")
    fig.suptitle(f"{results[0]['nodes']} nodes start one job at once; S3 at {GET_RATE:.0f} GET/s per partition")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--connections", type=int, default=16, help="parallel requests per node (castore's workers)")
    ap.add_argument("--latency", type=float, default=0.030, help="seconds to first byte of a GET")
    ap.add_argument("--conn-mbps", type=float, default=90.0, help="MB/s one connection reads")
    ap.add_argument("--get-rate", type=float, default=GET_RATE)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profile", type=Path, default=PROFILE)
    ap.add_argument("--profile-from", nargs=2, metavar=("URL", "BUNDLE"), help="write the profile of a published bundle")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--only", metavar="TEXT", help="run the scenarios whose name contains TEXT")
    args = ap.parse_args(argv)
    if args.profile_from:
        profile = profile_from_store(*args.profile_from)
        args.profile.parent.mkdir(parents=True, exist_ok=True)
        args.profile.write_text(json.dumps(profile, indent=1) + "\n")
        print(f"wrote {args.profile}")
        return
    profile = json.loads(args.profile.read_text())
    results = []
    for sc in SCENARIOS:
        if args.only and args.only not in sc.name:
            continue
        r = simulate(profile, sc, nodes=args.nodes, connections=args.connections, latency=args.latency,
                     conn_mbps=args.conn_mbps, get_rate=args.get_rate, seed=args.seed)  # fmt: skip
        results.append(r)
        print(json.dumps(r), flush=True)
    doc = {
        "profile": args.profile.name,
        "bundle": profile.get("bundle"),
        "assumptions": {
            "get_rate_per_partition": args.get_rate,
            "put_rate_per_partition": PUT_RATE,
            "connections_per_node": args.connections,
            "latency_s": args.latency,
            "conn_mbps": args.conn_mbps,
            "retry": f"full jitter, base {THROTTLED_BASE} s, cap {MAX_BACKOFF} s, {MAX_ATTEMPTS} attempts; "
            f"patient: {PATIENT_ROUNDS} rounds of those, {PATIENT_BASE} s doubling between rounds",
            "partition_scaling": "not modelled (one partition, or every prefix already split)",
            "seed": args.seed,
        },
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale_sim.json").write_text(json.dumps(doc, indent=1) + "\n")
    if not args.no_plot:
        plot(results, args.out / "scale_sim.png")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
