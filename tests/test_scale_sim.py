"""benchmarks/scale_sim.py: a small seeded run finishes in seconds, reproducibly, and packing cuts what the bucket sees."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _sim():  # noqa: ANN202 - the benchmark module
    spec = importlib.util.spec_from_file_location("scale_sim", ROOT / "benchmarks" / "scale_sim.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_sim"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_small_fleet_simulation_is_seeded_and_packing_cuts_requests(tmp_path: Path) -> None:
    sim = _sim()
    args = ["--nodes", "300", "--no-plot", "--out", str(tmp_path), "--only", "one partition"]
    sim.main(args)
    first = json.loads((tmp_path / "scale_sim.json").read_text())
    sim.main(args)
    assert json.loads((tmp_path / "scale_sim.json").read_text()) == first, "same seed, same figures"
    by_name = {r["scenario"]: r for r in first["results"]}
    per_object, packed = by_name["per-object, one partition"], by_name["packed, one partition"]
    assert packed["requests_per_node"] <= 10 < per_object["requests_per_node"]
    assert packed["requests_sent"] < per_object["requests_sent"] / 10
    assert packed["nodes_degraded"] == 0


def test_committed_results_come_from_the_committed_profile() -> None:
    doc = json.loads((ROOT / "benchmarks" / "results" / "scale" / "scale_sim.json").read_text())
    profile = json.loads((ROOT / "benchmarks" / "results" / "scale" / doc["profile"]).read_text())
    assert doc["bundle"] == profile["bundle"]
    packed = [r for r in doc["results"] if r["packed"] and not r["pinned_version"]]
    assert all(r["requests_per_node"] == 2 + len(profile["pack_reads"]) for r in packed)
    assert all(r["nodes"] == 10_000 for r in doc["results"])
