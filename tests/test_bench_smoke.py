"""Smoke test of the hot-load benchmark: `castore bench --quick` with a tiny model, end to end.

Runs real processes (cold, cold-writer, warm-local, and castore-hot against a SeaweedFS it starts itself); keep
it < 120 s.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.s3
@pytest.mark.timeout(600)  # 5 compiles of a 1-layer MLP: about 85 s on 2 cores
def test_bench_quick_writes_json_markdown_chart_and_ratios(tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "castore.bench.hot_load", "--quick", "--models", "mlp:infer", "--layers", "1", "--batch", "8",
         "--modes", "cold-writer,castore-hot", "--out", str(out), "--work-dir", str(tmp_path), "--timeout", "240"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The markdown table is printed last.
    assert proc.stdout.strip().splitlines()[0].startswith("### Hot load")
    assert "| mlp:infer | castore-hot |" in proc.stdout

    report = json.loads((out / "hot_load.json").read_text())
    assert (out / "hot_load.md").read_text().strip() == proc.stdout.strip()
    png = (out / "hot_load.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert report["repeats"] == 1 and report["modes"] == ["cold", "cold-writer", "warm-local", "castore-hot"]
    assert report["note"] == ""  # only what --note says
    rows = {r["mode"]: r for r in report["summary"]}
    assert set(rows) >= {"cold", "warm-local", "castore-hot", "castore-cold"}
    for mode in ("cold", "warm-local", "castore-hot"):
        row = rows[mode]
        assert row["ok"] == 1, (mode, row["errors"], report["runs"])
        assert row["first_output_s"]["min"] <= row["first_output_s"]["median"] <= row["first_output_s"]["max"]
        assert row["first_output_over_warm_local"] is not None and row["first_output_over_cold"] is not None
    assert rows["cold"]["first_output_over_cold"] == 1.0 and rows["warm-local"]["first_output_over_warm_local"] == 1.0
    hot = rows["castore-hot"]
    expected = hot["first_output_s"]["median"] / rows["warm-local"]["first_output_s"]["median"]
    assert abs(hot["first_output_over_warm_local"] - expected) < 0.01
    assert hot["digests_match_cold"] is True  # same outputs as the cold compile
    assert hot["digests_match_writer"] is True  # and as the castore-cold run that filled the bucket
    # (No assertion on hits: on an overloaded machine castore's slow-request breaker may skip the store.)
    # The writer compiled into an empty store of its own: nothing to hit, everything written, same outputs.
    writer = rows["cold-writer"]
    assert writer["ok"] == 1 and writer["fx_hits"] == 0 and writer["digests_match_cold"] is True
    assert writer["first_output_paired_over_cold"]["n"] == 1 and writer["compile_paired_over_cold"]["n"] == 1
    (writer_run,) = [r for r in report["runs"] if r["mode"] == "cold-writer"]
    assert writer_run["result"]["castore"]["caches"]["fx-graph"]["puts"] == 1
    # Raw per-process JSON is kept too.
    raw = sorted(p.name for p in (out / "raw").iterdir())
    assert any(name.startswith("mlp_infer-castore-hot-0") for name in raw), raw
    assert all(json.loads((out / "raw" / name).read_text())["result"] for name in raw)


def _run(mode: str, digest: str, seconds: float = 1.0, repeat: int = 0, call: str | None = None):  # noqa: ANN202
    from castore.bench.modes import Run

    result = {"seconds_to_first_output": seconds, "seconds_compile": seconds / 2, "output_digest": digest, "fxgraph": {}}
    return Run(model="m:infer", mode=mode, repeat=repeat, ok=True, result=result, call=call)


def test_a_hot_start_is_checked_against_the_compile_that_wrote_its_caches() -> None:
    """With autotuning, two cold compiles may pick different configs: castore-hot must reproduce castore-cold's
    output (it loads its entries), warm-local the cold run's; a re-tuning warm start shows up as a mismatch."""
    from castore.bench.report import summarize

    runs = [_run("cold", "aaaa", 10), _run("castore-cold", "bbbb", 11), _run("castore-hot", "bbbb", 2),
            _run("warm-local", "cccc", 2)]  # fmt: skip
    rows = {r["mode"]: r for r in summarize(runs, ["m:infer"], ["cold", "warm-local", "castore-hot"])}
    assert rows["castore-hot"]["digests_match_writer"] is True and rows["castore-hot"]["digests_match_cold"] is False
    assert rows["warm-local"]["digests_match_writer"] is False
    assert rows["cold"]["digests_match_writer"] is None


def test_outputs_that_differ_in_the_last_bits_are_told_from_other_outputs() -> None:
    """A training step whose gradient is accumulated with atomic adds gives another digest between runs of the same
    code: its output sums are compared with a tolerance; another model's outputs stay a mismatch."""
    from castore.bench.report import markdown, summarize

    def run(mode: str, digest: str, sums: list, repeat: int = 0):  # noqa: ANN001, ANN202
        r = _run(mode, digest, repeat=repeat)
        r.result["output_sums"] = sums
        return r

    writer = [[12.5, 40.0], [-0.25, 3.0]]
    last_bits = [[12.5 + 1e-6, 40.0 - 1e-6], [-0.25 - 2e-7, 3.0]]
    other = [[12.9, 40.0], [-0.25, 3.0]]  # one sum off by 1 % of its magnitudes
    runs = [run("cold", "aaaa", writer), run("castore-aot-cold", "aaaa", writer),
            run("castore-aot", "aaaa", writer), run("castore-aot", "bbbb", last_bits, repeat=1),
            run("warm-local", "cccc", other)]  # fmt: skip
    rows = {r["mode"]: r for r in summarize(runs, ["m:infer"], ["cold", "warm-local", "castore-aot"])}
    aot = rows["castore-aot"]
    assert aot["digests_match_writer"] is False and aot["outputs_close_to_writer"] is True
    assert aot["outputs_against_writer"] == {"compared": 2, "same_digest": 1, "with_sums": 2, "close": 2}
    assert rows["warm-local"]["outputs_close_to_writer"] is False
    report = {"machine": {}, "machine_slug": "test", "repeats": 2, "summary": list(rows.values())}
    table = markdown(report)
    assert "| 1/2 same, 2/2 within 0.001 |" in table and "| 0/1 same, 0/1 within 0.001 |" in table


def _report(run_id: str, runs: list, slug: str = "gpu-test") -> dict:  # noqa: ANN001
    return {"run_id": run_id, "machine_slug": slug, "started": "2026-11-28T05:00:00+0000", "duration_s": 10.0,
            "models": ["m:infer"], "modes": ["cold", "warm-local", "castore-hot"], "runs": [r.to_dict() for r in runs]}  # fmt: skip


def test_merged_calls_pool_their_runs_and_check_each_against_its_own_writer() -> None:
    """Two device calls of one model: runs renumbered and tagged by call, never-started processes dropped, and a
    hot start compared with the castore-cold run of its own call (two calls' compiles may differ)."""
    from castore.bench.modes import Run
    from castore.bench.report import merge_reports

    first = [_run("cold", "aaaa", 10), _run("castore-cold", "bbbb", 11), _run("castore-hot", "bbbb", 2),
             _run("warm-local", "aaaa", 2)]  # fmt: skip
    second = [_run("cold", "cccc", 12), _run("castore-cold", "dddd", 13), _run("castore-hot", "dddd", 4),
              _run("warm-local", "cccc", 3), Run(model="m:infer", mode="warm-local", repeat=1, error="not run: past --deadline 500 s")]  # fmt: skip
    merged = merge_reports([_report("call-1", first), _report("call-2", second)])

    assert merged["merged_from"] == ["call-1", "call-2"]
    hot = [r for r in merged["runs"] if r["mode"] == "castore-hot"]
    assert [(r["repeat"], r["call"]) for r in hot] == [(0, "call-1"), (1, "call-2")]
    assert len([r for r in merged["runs"] if r["mode"] == "warm-local"]) == 2  # the unstarted one is gone
    rows = {r["mode"]: r for r in merged["summary"]}
    assert rows["castore-hot"]["digests_match_writer"] is True
    assert rows["warm-local"]["digests_match_cold"] is True
    assert rows["castore-hot"]["first_output_s"]["median"] == 3.0
    assert rows["castore-hot"]["first_output_over_warm_local"] == 1.2  # 3.0 / 2.5, medians of the pooled runs
    assert rows["castore-hot"]["first_output_paired_over_warm_local"] == {"median": 1.167, "n": 2}  # 2 / 2, 4 / 3


def test_a_merged_report_merged_again_keeps_each_repeat_paired() -> None:
    """An earlier merged report pooled with a new call: every call's repeats keep their pairing, although one mode
    of the first call stopped a repeat short at its deadline."""
    from castore.bench.report import merge_reports

    def run(mode: str, repeat: int, seconds: float):  # noqa: ANN202
        return _run(mode, "d", seconds, repeat)

    first = [run("warm-local", 0, 10), run("castore-hot", 0, 11), run("warm-local", 1, 20), run("castore-hot", 1, 22),
             run("warm-local", 2, 30)]  # fmt: skip
    second = [run("castore-hot", 0, 5), run("warm-local", 0, 4), run("warm-local", 1, 8), run("castore-hot", 1, 10)]
    once = merge_reports([_report("call-1", first), _report("call-2", second)])
    third = [run("warm-local", 0, 100), run("castore-hot", 0, 100)]
    twice = merge_reports([once, _report("call-3", third)])

    pairs = {(r["call"], r["mode"], r["repeat"]) for r in twice["runs"]}
    assert ("call-2", "castore-hot", 3) in pairs and ("call-2", "warm-local", 3) in pairs  # after call-1's 0..2
    assert ("call-3", "castore-hot", 5) in pairs and ("call-3", "warm-local", 5) in pairs
    hot = {r["mode"]: r for r in twice["summary"]}["castore-hot"]
    assert hot["first_output_paired_over_warm_local"] == {"median": 1.1, "n": 5}  # 1.1, 1.1, 1.25, 1.25, 1.0


def test_the_paired_ratio_compares_each_process_with_the_warm_start_of_its_own_repeat() -> None:
    """Each process is divided by the warm-local process of its own repeat in its own call (run back to back, so a
    machine that drifts between repeats or calls moves both); a repeat without a warm-local one is left out."""
    from castore.bench.report import summarize

    def run(mode: str, repeat: int, seconds: float, call: str = "c1"):  # noqa: ANN202
        return _run(mode, "d", seconds, repeat, call)

    runs = [run("warm-local", 0, 10), run("castore-hot", 0, 9), run("warm-local", 1, 20), run("castore-hot", 1, 19),
            run("warm-local", 2, 21), run("castore-hot", 2, 22), run("castore-hot", 3, 5),  # no warm-local in repeat 3
            run("warm-local", 0, 40, "c2"), run("castore-hot", 0, 36, "c2")]  # fmt: skip
    rows = {r["mode"]: r for r in summarize(runs, ["m:infer"], ["warm-local", "castore-hot"])}
    paired = rows["castore-hot"]["first_output_paired_over_warm_local"]
    # 0.9, 0.95, 1.048 and c2's 36 / 40 (not 36 / 10, c1's repeat 0); repeat 3 has no warm-local to pair with
    assert paired == {"median": 0.925, "n": 4}
    assert rows["warm-local"]["first_output_paired_over_warm_local"] == {"median": 1.0, "n": 4}


def test_merging_results_of_different_machines_is_refused() -> None:
    from castore.bench.report import merge_reports

    with pytest.raises(SystemExit, match="different machines"):
        merge_reports([_report("a", [_run("cold", "aaaa")], "gpu-h100"), _report("b", [_run("cold", "aaaa")], "gpu-h200")])


def test_each_repeat_rotates_the_order_of_the_modes() -> None:
    """No mode always runs right after the same other mode (a writer's page-cache flush, a GPU context teardown)."""
    from castore.bench.hot_load import rotated

    modes = ["warm-local", "castore-hot", "castore-hot+rtt"]
    orders = [rotated(modes, r) for r in range(4)]
    assert orders[0] == modes and orders[3] == modes
    assert [o[0] for o in orders[:3]] == modes  # each mode leads once in three repeats
    assert all(sorted(o) == sorted(modes) for o in orders)


def test_the_writers_tax_divides_each_cold_writer_process_by_the_cold_one_of_its_repeat() -> None:
    """cold-writer against cold, per repeat, for the time to first output and for the compile phase alone."""
    from castore.bench.report import summarize

    def run(mode: str, repeat: int, seconds: float, compile_s: float):  # noqa: ANN202
        r = _run(mode, "d", seconds, repeat)
        r.result["seconds_compile"] = compile_s
        return r

    runs = [run("cold", 0, 20, 18), run("cold-writer", 0, 21, 19.8), run("cold", 1, 30, 27), run("cold-writer", 1, 30, 27),
            run("cold", 2, 25, 22), run("cold-writer", 2, 24, 22.66)]  # fmt: skip
    rows = {r["mode"]: r for r in summarize(runs, ["m:infer"], ["cold", "cold-writer"])}
    writer = rows["cold-writer"]
    assert writer["first_output_paired_over_cold"] == {"median": 1.0, "n": 3}  # 1.05, 1.0, 0.96
    assert writer["compile_paired_over_cold"] == {"median": 1.03, "n": 3}  # 1.1, 1.0, 1.03
    assert "first_output_paired_over_cold" not in rows["cold"]
