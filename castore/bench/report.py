"""The hot-load benchmark's report: per-mode summaries and ratios, the markdown table, the chart, the raw
per-process files, and the pooling of several results of one machine (``--merge``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import uuid
from collections.abc import Callable
from typing import Any

from castore.bench.modes import BREAKER_MESSAGE, MODES, NOT_STARTED, POPULATE_MODES, Run, model_slug, run_of, split_model_spec, uses_store

# -- summary ----------------------------------------------------------------------------------------------------
def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def _median_of(runs: list[Run], get: Any) -> float | None:
    vals = []
    for r in runs:
        try:
            v = get(r.result)
        except (KeyError, TypeError, AttributeError):
            continue
        if isinstance(v, (int, float)):
            vals.append(v)
    return statistics.median(vals) if vals else None


OUTPUT_RTOL = 1e-3  # of a tensor's sum of magnitudes: far below what another model or input changes


def sums_close(got: list[list[float]], want: list[list[float]], rtol: float = OUTPUT_RTOL) -> bool:
    """Whether two runs' output sums (per tensor: sum, sum of magnitudes) agree within rtol of the magnitudes."""
    if len(got) != len(want):
        return False
    for (s_got, a_got), (s_want, a_want) in zip(got, want):
        scale = max(abs(a_got), abs(a_want)) * rtol + 1e-12
        if abs(s_got - s_want) > scale or abs(a_got - a_want) > scale:
            return False
    return True


def summarize(runs: list[Run], models: list[str], modes: list[str]) -> list[dict[str, Any]]:
    rows = []
    for model in models:
        label = ":".join(split_model_spec(model))
        mine = [r for r in runs if r.model == label]

        def ref_result(ref: str, call: str | None) -> dict[str, Any]:
            """The result of the call's first ok run of mode ref (each call compiled its own caches); {} if none."""
            return next((r.result for r in mine if r.ok and r.mode == ref and r.call == call), {})

        def digest_of(ref: str, call: str | None) -> str | None:
            return ref_result(ref, call).get("output_digest")

        def writer_of(mode: str) -> str | None:
            """The mode whose caches this mode loads: with autotuning, two cold compiles may pick different kernel
            configs (and bf16 results), so a hot start is checked against its own writer."""
            if mode == "castore-aot":
                return POPULATE_MODES["castore-aot"]
            if mode.startswith("castore") and mode != POPULATE_MODES["castore"]:
                return POPULATE_MODES["castore"]
            if mode == "redis-remote":
                return POPULATE_MODES["redis"]
            if mode in ("warm-local", "megacache"):
                return "cold"
            return None

        def against_writer(ok: list[Run], ref: str | None) -> dict[str, int]:
            """How many runs have their writer's digest, and how many its output sums within OUTPUT_RTOL (of those
            whose runs recorded sums: older results have none)."""
            refs = [(r, ref_result(ref, r.call)) for r in ok] if ref else []
            compared = [(r, want.get("output_digest"), want.get("output_sums")) for r, want in refs if want.get("output_digest")]
            same = sum(1 for r, digest, _ in compared if r.result.get("output_digest") == digest)
            with_sums = [(r.result["output_sums"], sums) for r, _, sums in compared if r.result.get("output_sums") and sums]
            close = sum(1 for got, want in with_sums if sums_close(got, want))
            return {"compared": len(compared), "same_digest": same, "with_sums": len(with_sums), "close": close}

        def all_match(ok: list[Run], ref: str | None) -> bool | None:
            """Every run's digest equals its own call's ref run's; None where there is nothing to compare."""
            pairs = [(r.result.get("output_digest"), digest_of(ref, r.call)) for r in ok] if ref else []
            if not pairs or any(want is None for _, want in pairs):
                return None
            return all(got == want for got, want in pairs)
        by_mode: dict[str, dict[str, Any]] = {}
        for mode in modes + list(POPULATE_MODES.values()):
            sel = [r for r in mine if r.mode == mode]
            if not sel:
                continue
            ok = [r for r in sel if r.ok]
            row: dict[str, Any] = {
                "model": label,
                "mode": mode,
                "runs": len(sel),
                "ok": len(ok),
                "failed": len(sel) - len(ok),
                "errors": sorted({r.error for r in sel if r.error}),
                "first_output_s": _stats([r.result["seconds_to_first_output"] for r in ok]),
                "compile_s": _stats([r.result["seconds_compile"] for r in ok]),
                "digests_match_cold": all_match(ok, "cold"),
                "digests_match_writer": all_match(ok, writer_of(mode)),
                "outputs_against_writer": (against := against_writer(ok, writer_of(mode))),
                # every run compared with its writer's sums, and within OUTPUT_RTOL; None where some could not be
                "outputs_close_to_writer": against["close"] == len(ok) if ok and against["with_sums"] == len(ok) else None,
                "fx_hits": _median_of(ok, lambda x: x["fxgraph"].get("fxgraph_cache_hit", 0)),
                "fx_misses": _median_of(ok, lambda x: x["fxgraph"].get("fxgraph_cache_miss", 0)),
                "compiler_runs": _median_of(ok, lambda x: x["compiler_runs"]),
                "triton_compiles": _median_of(ok, lambda x: x["triton_compiles"]),
                "autotune_calls": _median_of(ok, lambda x: x["autotune_calls_total"]),
                "megacache_load_s": _median_of(ok, lambda x: x["megacache_load"]["seconds"]),
                # lookups castore skipped (circuit breaker open after a store error or a get over slow_request)
                "castore_skipped": _median_of(ok, lambda x: sum(c.get("skipped", 0) for c in x["castore"]["caches"].values())),
                "castore_breaker_runs": sum(1 for r in ok if r.breaker or BREAKER_MESSAGE in r.stderr_tail) if uses_store(mode) else None,
                "populating_run": mode in POPULATE_MODES.values(),
            }
            by_mode[mode] = row
        for row in by_mode.values():
            row["first_output_paired_over_warm_local"] = _paired_ratio(mine, row["mode"], "warm-local")
            # the compile phase alone: where castore acts; imports and model building are the same work in every mode
            row["compile_paired_over_warm_local"] = _paired_ratio(mine, row["mode"], "warm-local", "seconds_compile")
            if row["mode"] == "cold-writer":  # the writer's tax: against the plain cold compile of the same repeat
                row["first_output_paired_over_cold"] = _paired_ratio(mine, row["mode"], "cold")
                row["compile_paired_over_cold"] = _paired_ratio(mine, row["mode"], "cold", "seconds_compile")
            for ref in ("warm-local", "cold"):
                base = by_mode.get(ref)
                for metric in ("first_output_s", "compile_s"):
                    key = f"{metric.removesuffix('_s')}_over_{ref.replace('-', '_')}"
                    if row[metric] and base and base[metric] and base[metric]["median"] > 0:
                        row[key] = round(row[metric]["median"] / base[metric]["median"], 3)
                    else:
                        row[key] = None
        rows.extend(by_mode.values())
    return rows


def _paired_ratio(runs: list[Run], mode: str, ref: str, metric: str = "seconds_to_first_output") -> dict[str, float] | None:
    """Median over repeats of mode's time to first output divided by that of ref's process in the same repeat of the
    same call. The processes of one repeat run back to back, so this cancels what the machine drifts between
    repeats and between device calls, which the ratio of medians does not; None without a pair."""
    base = {(r.call, r.repeat): r.result[metric] for r in runs if r.ok and r.mode == ref}
    ratios = [
        r.result[metric] / base[(r.call, r.repeat)]
        for r in runs
        if r.ok and r.mode == mode and base.get((r.call, r.repeat), 0) > 0
    ]
    return {"median": round(statistics.median(ratios), 3), "n": len(ratios)} if ratios else None


# -- markdown table and chart ----------------------------------------------------------------------------------------
def _fmt_paired(v: dict[str, float] | None, compile_: dict[str, float] | None = None) -> str:
    if not v:
        return "–"
    return f"{v['median']:.2f}×" + (f", {compile_['median']:.2f}×" if compile_ else "") + f" ({v['n']:g})"


def _fmt_paired_pair(first: dict[str, float] | None, compile_: dict[str, float] | None) -> str:
    return f"{first['median']:.3f}×, {compile_['median']:.3f}× ({first['n']:g})" if first and compile_ else "–"


def _fmt_s(s: dict[str, float] | None) -> str:
    return f"{s['median']:.2f} ({s['min']:.2f}–{s['max']:.2f})" if s else "failed"


def _fmt_x(v: float | None) -> str:
    return f"{v:.2f}×" if v is not None else "–"


def _fmt_n(v: float | None) -> str:
    return "–" if v is None else (f"{v:g}")


def _fmt_breaker(row: dict[str, Any]) -> str:
    if row.get("castore_breaker_runs") is None:
        return "–"
    return f"{_fmt_n(row.get('castore_skipped'))} (breaker in {row['castore_breaker_runs']}/{row['ok']})"


def _fmt_outputs(row: dict[str, Any]) -> str:
    """Runs with their writer's output digest, and (where it differs in some) within OUTPUT_RTOL of its sums."""
    against = row.get("outputs_against_writer") or {}
    n = against.get("compared") or 0
    if not n:
        return "–"
    text = f"{against['same_digest']}/{n} same"
    if against["same_digest"] != n and against.get("with_sums"):
        text += f", {against['close']}/{against['with_sums']}" + (" with sums" if against["with_sums"] != n else "")
        text += f" within {OUTPUT_RTOL:g}"
    return text


def _process_count(report: dict[str, Any]) -> str:
    """How many processes each mode's medians are over: the repeats of one command, or a range once pooled."""
    if report.get("merged_from"):
        counts = sorted({row["runs"] for row in report["summary"] if not row["populating_run"] and row["mode"] != "cold"})
        if counts and counts[0] != counts[-1]:
            return f"{counts[0]}–{counts[-1]}"
    return str(report["repeats"])


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"### Hot load: {report['machine_slug']} (torch {m.get('torch')}, {m.get('device_name') or str(m.get('cpus')) + ' CPUs'}), "
        f"{_process_count(report)} processes per mode"
        + (
            f", pooled from {len(report['merged_from'])} results (the ok column counts each mode's)"
            if report.get("merged_from")
            else f" ({report['cold_repeats']} cold)" if report.get("cold_repeats", report["repeats"]) != report["repeats"] else ""
        )
        + ", medians (min–max)",
        "",
        "| model | mode | ok | first output s | compile s | ×warm-local | ×cold | paired ×warm-local: first output, compile (pairs) | paired ×cold: first output, compile | FX hits | C++ runs | Triton compiles | autotune calls | store skipped | outputs = writer's |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["summary"]:
        name = row["mode"] + (" (populate)" if row["populating_run"] else "")
        lines.append(
            f"| {row['model']} | {name} | {row['ok']}/{row['runs']} | {_fmt_s(row['first_output_s'])} | {_fmt_s(row['compile_s'])} "
            f"| {_fmt_x(row['first_output_over_warm_local'])} | {_fmt_x(row['first_output_over_cold'])} "
            f"| {_fmt_paired(row.get('first_output_paired_over_warm_local'), row.get('compile_paired_over_warm_local'))} "
            f"| {_fmt_paired_pair(row.get('first_output_paired_over_cold'), row.get('compile_paired_over_cold'))} | {_fmt_n(row['fx_hits'])} "
            f"| {_fmt_n(row['compiler_runs'])} | {_fmt_n(row['triton_compiles'])} | {_fmt_n(row['autotune_calls'])} "
            f"| {_fmt_breaker(row)} | {_fmt_outputs(row)} |"
        )
    dd = report.get("dedup")
    if dd and dd.get("stored_bytes"):
        lines += [
            "",
            f"Dedup ({dd['model']}, {len(dd['variants'])} variants: layers×batch "
            + ", ".join(f"{v['layers']}×{v['batch']}" for v in dd["variants"])
            + f"): logical {dd['logical_bytes']:,} B, stored {dd['stored_bytes']:,} B, logical/stored {dd['logical_over_stored']:.2f}×",
        ]
    elif dd:
        lines += ["", f"Dedup: {dd.get('error', 'no result')}"]
    if report.get("note"):
        lines += ["", f"Note: {report['note']}"]
    lines += [
        "",
        "×warm-local and ×cold: median time to first output of the mode divided by that of warm-local / cold, same run. "
        "Paired ×warm-local: the median, over the repeats where both ran, of the mode's time divided by that of the "
        "warm-local process of the same repeat (run back to back, so the machine's drift between repeats cancels), for "
        "the time to first output and for the compile phase alone; "
        "paired ×cold likewise against the cold process of the same repeat (cold-writer: the writer's tax). "
        "FX hits, C++ runs (castore modes), Triton compiles (ptxas runs) and autotune calls (GPU): medians per process. "
        "Store skipped: castore lookups skipped because its circuit breaker was open (a store error, or a get slower than "
        "slow_request), and in how many processes the breaker opened. Outputs = writer's: how many processes gave the "
        "output digest of the compile that wrote what they load (cold for warm-local), and, where some did not, how many "
        f"had each output tensor's sum and sum of magnitudes within {OUTPUT_RTOL:g} of its (kernels that accumulate "
        "with atomic adds differ in the last bits between runs of the same code).",
    ]
    return "\n".join(lines)


def draw_chart(report: dict[str, Any], path: str) -> str | None:
    """Draw the bar chart of the measured modes at path. Returns None once drawn, else why it was not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    rows = [r for r in report["summary"] if not r["populating_run"] and r["first_output_s"]]
    models = list(dict.fromkeys(r["model"] for r in rows))
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    if not models or not modes:
        return "no process of a measured mode succeeded"
    width = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(models) * max(1, len(modes) / 3)), 4.5))
    cmap = plt.get_cmap("tab10")
    for i, mode in enumerate(modes):
        xs, ys, lo, hi = [], [], [], []
        for j, model in enumerate(models):
            row = next((r for r in rows if r["model"] == model and r["mode"] == mode), None)
            if row and row["first_output_s"]:
                s = row["first_output_s"]
                xs.append(j + (i - (len(modes) - 1) / 2) * width)
                ys.append(s["median"])
                lo.append(s["median"] - s["min"])
                hi.append(s["max"] - s["median"])
        if xs:
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=mode, color=cmap(i % 10))
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([":".join(os.path.basename(part) for part in m.split(":")) for m in models])  # no folders
    ax.set_ylabel("seconds from process start to first compiled output")
    ax.set_title(f"torch.compile hot load, {report['machine_slug']} (median, min–max over {_process_count(report)} processes)", fontsize=9)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None



# -- pooling the results of several calls (--merge) ------------------------------------------------------------------
def read_report(directory: str) -> dict[str, Any]:
    with open(os.path.join(directory, "hot_load.json")) as f:
        return json.load(f)


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report of the runs of several, all from one machine, each run tagged with the run_id of the call that
    measured it. Ratios stay side by side: every call measured its own baselines, interleaved with the castore modes.

    A call's runs keep their repeat numbers, shifted past the earlier calls' of the same model, so the processes of
    one repeat stay paired (the paired ratio). Within a call a mode's runs are numbered from 0 in order (only the
    tail of a call is ever left unstarted), which also recovers the numbers from an earlier merged report."""
    if not reports:
        raise ValueError("nothing to merge")
    slugs = {r["machine_slug"] for r in reports}
    if len(slugs) != 1:
        raise SystemExit(f"refusing to pool runs of different machines: {', '.join(sorted(slugs))}")
    by_call: dict[str, list[dict[str, Any]]] = {}
    for report in reports:
        for run in report["runs"]:
            if not (run.get("error") or "").startswith(NOT_STARTED):
                call = run.get("call") or report["run_id"]
                by_call.setdefault(call, []).append(dict(run, call=call))
    runs: list[dict[str, Any]] = []
    counts: dict[tuple[str, str], int] = {}  # (model, mode) -> runs pooled
    offset: dict[str, int] = {}  # model -> first repeat number free for the next call
    for call_runs in by_call.values():
        rank: dict[tuple[str, str], int] = {}
        ends = dict(offset)
        for run in call_runs:
            key = (run["model"], run["mode"])
            run["repeat"] = offset.get(run["model"], 0) + rank.get(key, 0)
            rank[key] = rank.get(key, 0) + 1
            counts[key] = counts.get(key, 0) + 1
            ends[run["model"]] = max(ends.get(run["model"], 0), run["repeat"] + 1)
            runs.append(run)
        offset = ends
    models = list(dict.fromkeys(m for r in reports for m in r["models"]))
    modes = [m for m in MODES if any(m in r["modes"] for r in reports)]
    calls = list(by_call)
    merged = dict(reports[0])
    merged.update({
        "run_id": "merged-" + uuid.uuid4().hex[:6],
        "merged_from": calls,
        "started": min(r["started"] for r in reports),
        "duration_s": round(sum(r.get("duration_s") or 0 for r in reports), 1),
        "models": models,
        "modes": modes,
        "repeats": max(counts.values(), default=0),
        "cold_repeats": max((n for (_, mode), n in counts.items() if mode == "cold"), default=0),
        "summary": summarize([run_of(r) for r in runs], models, modes),
        "dedup": next((r["dedup"] for r in reports if r.get("dedup")), None),
        "runs": runs,
    })
    return merged



# -- files -----------------------------------------------------------------------------------------------------------
def write_raw_run(raw_dir: str, run: dict[str, Any]) -> None:
    """raw/<model>-<mode>-<repeat>.json: one process, with its longer stderr tail."""
    os.makedirs(raw_dir, exist_ok=True)
    name = model_slug(run["model"]) + re.sub(r"[^A-Za-z0-9_.-]+", "_", f"-{run['mode']}-{run['repeat']}")
    with open(os.path.join(raw_dir, name + ".json"), "w") as f:
        json.dump(run, f, indent=1)


def write_raw(runs: list[dict[str, Any]], raw_dir: str) -> None:
    if os.path.isdir(raw_dir):
        shutil.rmtree(raw_dir)
    for run in runs:
        write_raw_run(raw_dir, run)


def write_report(report: dict[str, Any], out: str, say: Callable[[str], None]) -> str:
    """hot_load.json, hot_load.md and (with matplotlib) hot_load.png under out; returns the markdown table."""
    json_path = os.path.join(out, "hot_load.json")
    md_path = os.path.join(out, "hot_load.md")
    png_path = os.path.join(out, "hot_load.png")
    table = markdown(report)
    report["files"] = {"json": json_path, "markdown": md_path, "chart": png_path, "raw": os.path.join(out, "raw")}
    not_drawn = draw_chart(report, png_path)
    if not_drawn is not None:
        report["files"]["chart"] = None
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    with open(md_path, "w") as f:
        f.write(table + "\n")
    written = [json_path, md_path] + ([png_path] if not_drawn is None else [])
    say("wrote " + ", ".join(os.path.abspath(p) for p in written))
    if not_drawn is not None:
        stale = " (the hot_load.png there is from an earlier report)" if os.path.exists(png_path) else ""
        say(f"chart skipped: {not_drawn}{stale}")
    return table
