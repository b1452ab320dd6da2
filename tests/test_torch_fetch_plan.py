"""Fetch plans: a fresh process fetches, in parallel at its first graph lookup, what the last process that
compiled the same graph used, so its later lookups are local-layer hits (castore/torch/session.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from castore.config import load_config
from castore.testing.faultproxy import FaultProxy
from castore.torch import session as session_module
from castore.torch.session import StoreSession, decode_plan, encode_plan

AOT = "pt2:aot-autograd-v1::aabbcc:c1"
ENTRIES = [
    ("fx-graph", "pt2:fx-graph-v1::fx1:c1"),
    ("fx-graph", "pt2:fx-graph-v1::fx2:c1"),
    ("cpp-kernel", "cpp.0123456789abcdef.ab_cabc.main.so"),
    ("triton", "triton.0123456789abcdef.KEY.triton_poi_0.json"),
]


def machine(root: Path, url: str, **overrides: object) -> StoreSession:
    return StoreSession(load_config({"url": url, "cache_dir": str(root / "local"), **overrides}, env={}), "torch-test")


def compile_cold(root: Path, url: str) -> None:
    """What a cold process does: its first graph lookup misses, then it writes every artifact, then exits."""
    s = machine(root, url)
    assert s.get("aot-autograd", AOT) is None
    s.put("aot-autograd", AOT, b"aot entry")
    for i, (cache, key) in enumerate(ENTRIES):
        s.put(cache, key, bytes([i]) * (300_000 if cache == "fx-graph" else 2_000))
    s.close()  # at exit: flush, and write the fetch plan


@pytest.fixture
def far_url(seaweedfs, s3_bucket: str, s3_url: str) -> Iterator[str]:  # noqa: ANN001
    """The test bucket behind 30 ms of added latency per request: a bucket in the same region, not next door."""
    with FaultProxy(seaweedfs.endpoint, latency=0.030) as proxy:
        yield f"s3://{s3_bucket}/prefix?endpoint={proxy.endpoint}"


def fetches(s: StoreSession) -> int:
    return s.store.local.stats.misses  # objects the local layer had to fetch from the bucket


def test_a_fresh_process_prefetches_everything_at_its_first_graph_lookup(tmp_path: Path, far_url: str) -> None:
    compile_cold(tmp_path / "a", far_url)

    hot = machine(tmp_path / "b", far_url)
    assert hot.get("aot-autograd", AOT) == b"aot entry"
    assert hot._prefetcher is not None
    hot._prefetcher.join(30)
    assert hot.stats.prefetched == len(ENTRIES)
    before = fetches(hot)
    for i, (cache, key) in enumerate(ENTRIES):
        assert hot.get(cache, key) is not None
    assert fetches(hot) == before, "a lookup after the prefetch went to the bucket"
    hot.close()
    assert hot.stats.caches["fetch-plan"].puts == 0, "an unchanged plan is not written again"


def test_a_process_that_uses_more_extends_the_plan(tmp_path: Path, far_url: str) -> None:
    compile_cold(tmp_path / "a", far_url)
    second = machine(tmp_path / "b", far_url)
    assert second.get("aot-autograd", AOT) is not None
    second._prefetcher.join(30)
    second.put("fx-graph", "pt2:fx-graph-v1::recompile:c1", b"a graph compiled later")
    second.close()
    assert second.stats.caches["fetch-plan"].puts == 1

    third = machine(tmp_path / "c", far_url)
    third.get("aot-autograd", AOT)
    third._prefetcher.join(30)
    assert third.stats.prefetched == len(ENTRIES) + 1
    third.close()
    assert third.stats.caches["fetch-plan"].puts == 0


def test_a_process_that_only_reads_narrows_the_plan_to_what_it_read(tmp_path: Path, far_url: str) -> None:
    compile_cold(tmp_path / "a", far_url)
    reader = machine(tmp_path / "b", far_url)
    assert reader.get("aot-autograd", AOT) is not None
    reader._prefetcher.join(30)
    used = ENTRIES[:2]  # say the cold compile also wrote kernels that an FX hit never looks up
    assert all(reader.get(c, k) is not None for c, k in used)
    reader.close()
    assert reader.stats.caches["fetch-plan"].puts == 1

    fresh = machine(tmp_path / "c", far_url)
    fresh.get("aot-autograd", AOT)
    fresh._prefetcher.join(30)
    assert fresh.stats.prefetched == len(used)
    assert all(fresh.get(c, k) is not None for c, k in used)
    fresh.close()
    assert fresh.stats.caches["fetch-plan"].puts == 0, "the same reads again: the plan stays as it is"


@pytest.mark.parametrize("cpus", [2, 16])
def test_a_store_next_door_is_read_lookup_by_lookup_only_on_a_machine_of_few_cpus(
    tmp_path: Path, s3_url: str, cpus: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SeaweedFS on loopback answers in a few ms: on 2 CPUs a parallel fetch would only compete with the compile;
    # with CPUs to spare it runs whatever the round trip.
    monkeypatch.setattr(session_module, "usable_cpus", lambda: cpus)
    compile_cold(tmp_path / "a", s3_url)
    near = machine(tmp_path / "b", s3_url)
    assert near.get("aot-autograd", AOT) == b"aot entry"
    near._prefetcher.join(30)
    assert near.stats.prefetched == (0 if cpus < session_module.PREFETCH_ALWAYS_CPUS else len(ENTRIES))
    assert all(near.get(c, k) is not None for c, k in ENTRIES)


def test_prefetch_off_and_read_only_sessions(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/bucket"
    compile_cold(tmp_path / "a", url)
    off = machine(tmp_path / "b", url, prefetch=False)
    off.get("aot-autograd", AOT)
    assert off._prefetcher is None and off.stats.prefetched == 0

    ro = machine(tmp_path / "c", url, read_only=True)
    assert ro.get("aot-autograd", "pt2:aot-autograd-v1::other:c1") is None
    ro._prefetcher.join(30)
    ro.close()
    assert ro.stats.caches["fetch-plan"].puts == 0


def test_a_plan_that_cannot_be_read_is_an_empty_plan(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/bucket"
    s = machine(tmp_path / "a", url)
    s.put("fetch-plan", s.plan_key(("aot-autograd", AOT)), b"{not json")
    assert s.flush(30)
    fresh = machine(tmp_path / "b", url)
    assert fresh.get("aot-autograd", AOT) is None
    fresh._prefetcher.join(30)
    assert fresh.stats.prefetched == 0
    assert decode_plan(b'{"v": 2, "entries": [["fx-graph", "k"]]}') == []
    assert decode_plan(encode_plan([("fx-graph", "k")])) == [("fx-graph", "k")]
