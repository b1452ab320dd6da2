"""The README stays short, speaks of the software only, and every number in it agrees with a committed result."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
RESULTS = REPO / "benchmarks" / "results"
MAX_BYTES = 12_000
# Links to pages other branches add; checked once they exist (remove an entry when its page is in the tree).
# Columns of the README's results table -> (mode, how the number is read from its summary row); "–" where the
# results hold no such row (a mode not measured on that machine)
COLUMNS = {
    "warm-local s": ("warm-local", lambda row: row["first_output_s"]["median"]),
    "castore-hot": ("castore-hot", lambda row: row["first_output_paired_over_warm_local"]["median"]),
    "castore-hot+rtt": ("castore-hot+rtt", lambda row: row["first_output_paired_over_warm_local"]["median"]),
    "castore-aot": ("castore-aot", lambda row: row["first_output_paired_over_warm_local"]["median"]),
    "cold-writer": ("cold-writer", lambda row: row["first_output_paired_over_cold"]["median"]),
}

def readme() -> str:
    return README.read_text()


def section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def table_rows(text: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    return split[0], split[2:]


def test_readme_is_at_most_12_kb() -> None:
    assert len(README.read_bytes()) <= MAX_BYTES


def test_every_number_of_the_results_table_agrees_with_the_committed_json() -> None:
    text = section(readme(), "Results")
    header, rows = table_rows(text)
    assert header[:2] == ["machine", "model"] and set(header[2:]) == set(COLUMNS)
    # Each machine's rows come from the results its link names, [cpu](benchmarks/results/.../hot_load.md); a column
    # measured in a run of its own names that run too: [gpu cold-writer](benchmarks/results/.../hot_load.md)
    links: dict[tuple[str, str], str] = {}
    for label, path in re.findall(r"\[([\w+-]+(?: [\w+-]+)?)\]\((benchmarks/results/[\w./-]+)/hot_load\.md\)", text):
        machine, _, column = label.partition(" ")
        assert not column or column in COLUMNS, label
        links[(machine, column)] = path
    machines = set()
    for cells in rows:
        assert (cells[0], "") in links, cells[0]
        machines.add(cells[0])
        for name, shown in zip(header[2:], cells[2:]):
            source = links.get((cells[0], name)) or links[(cells[0], "")]
            report = json.loads((REPO / source / "hot_load.json").read_text())
            summary = {(row["model"], row["mode"]): row for row in report["summary"]}
            mode, read = COLUMNS[name]
            if (cells[1], mode) not in summary:
                assert shown == "–", (cells[0], cells[1], name, shown)
                continue
            value = read(summary[(cells[1], mode)])
            decimals = len(shown.partition(".")[2])
            assert f"{value:.{decimals}f}" == shown, (cells[0], cells[1], name, shown, value)
    assert machines == {"cpu", "gpu"}


def test_the_demo_output_shown_is_a_committed_one() -> None:
    text = section(readme(), "Two commands")
    link = re.search(r"\((benchmarks/results/[\w.-]+/demo\.txt)\)", text)
    assert link, "the demo output names the file it comes from"
    shown = re.search(r"```\n(model: .*?)```", text, re.S)
    assert shown, "no demo output block"
    assert shown.group(1).strip() == (REPO / link.group(1)).read_text().strip()


def test_readme_speaks_of_the_software_not_of_its_development() -> None:
    history = re.compile(r"\bissue\b|\bstop\b|\bsession\b|earlier code|\bnow\b|used to|\b20\d\d-\d\d-\d\d\b", re.I)
    assert history.findall(readme()) == []


def test_readme_links_to_files_that_exist() -> None:
    targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme())
    missing = [t for t in targets if not (REPO / t).exists()]
    assert targets and missing == []


def test_the_benchmarks_page_tables_agree_with_the_committed_json() -> None:
    """docs/BENCHMARKS.md's full hot-load and throughput tables, cell by cell, against the JSON each section links."""
    page = (REPO / "docs" / "BENCHMARKS.md").read_text()
    checked = 0
    for title in ("Hot load on CPU", "Hot load on GPU", "Store throughput"):
        text = page[page.index(f"\n## {title}") :]
        text = text[: text.find("\n## ", 1)]
        source = re.search(r"\[JSON\]\(\.\./(benchmarks/results/[\w./-]+\.json)\)", text)
        assert source, title
        report = json.loads((REPO / source.group(1)).read_text())
        header, rows = table_rows(text)
        for cells in rows:
            if "throughput" in report:
                size, kind = re.fullmatch(r"(\d+) MiB (\w+)", cells[0]).groups()
                item = next(t for t in report["throughput"] if t["size_mib"] == int(size) and t["kind"] == kind)
                want = [f"{item[k]:.0f}" for k in ("castore_get_mbps", "boto3_get_mbps")] + [f"{item['get_ratio']:.2f}"]
                want += [f"{item[k]:.0f}" for k in ("castore_put_mbps", "boto3_put_mbps")] + [f"{item['put_ratio']:.2f}"]
            else:
                row = next(r for r in report["summary"] if r["model"] == cells[0] and r["mode"] == cells[1])
                s = row["first_output_s"]
                want = [cells[0], cells[1], f"{row['ok']}/{row['runs']}", f"{s['median']:.2f} ({s['min']:.2f}–{s['max']:.2f})",
                        f"{row['first_output_over_warm_local']:.2f}", f"{row['first_output_paired_over_warm_local']['median']:.2f}",
                        f"{row['first_output_over_cold']:.2f}"]  # fmt: skip
            assert cells[-len(want) :] == want, (title, cells)
            checked += 1
    assert checked >= 30


def test_the_wider_model_set_tables_agree_with_the_committed_json() -> None:
    """The CPU and GPU sections of the wider model set: each table, cell by cell, against the JSON linked above it."""
    page = (REPO / "docs" / "BENCHMARKS.md").read_text()
    checked = 0
    for title in ("The wider model set, the writer and ahead-of-time functions on CPU",
                  "The wider model set, the writer and ahead-of-time functions on GPU",
                  "The eight models on the GPU, one benchmark per GPU",
                  "The GPU with its Python bytecode compiled",
                  "The rest of the GPU model set with bytecode compiled, the writer, and castore's presence",
                  "The eight CPU models with the collector held off during an ahead-of-time load",
                  "The eight GPU models with Triton's source key off the main thread",
                  "The eight CPU models with the source keys and the first call's collector pause",
                  "Ahead-of-time loads and the writer on one H200, one benchmark alone",
                  "The eight CPU models with the key's package lookup and each put's fingerprint once per setting",
                  "The writer's tax for the eight GPU models, one benchmark alone on one H200",
                  "The eight CPU models, every mode, four rounds",
                  "The writer's tax on CPU with the precompiled header linked",
                  "Ahead-of-time loads of five GPU models, coordinate descent's winner found again",
                  "Ahead-of-time loads of five GPU models, four calls of the same code",
                  "Ahead-of-time loads on CPU with the guards on globals' values",
                  "Ahead-of-time loads on CPU with key recipe 3",
                  "Ahead-of-time loads on CPU with the load's objects moved to the oldest generation"):  # fmt: skip
        text = page[page.index(f"\n## {title}") :]
        text = text[: text.find("\n## ", 1)]
        parts = re.split(r"\[JSON\]\(\.\./(benchmarks/results/[\w./-]+\.json)\)", text)
        for source, after in zip(parts[1::2], parts[2::2]):
            if "\n|" not in after:  # a result quoted in prose, with no table of its own
                continue
            report = json.loads((REPO / source).read_text())
            summary = {(r["model"], r["mode"]): r for r in report["summary"]}
            header, rows = table_rows(after[: after.find("\n\n", after.find("\n|"))])
            assert header[:2] == ["model", "mode"], (title, source)
            for cells in rows:
                row = summary[(cells[0], cells[1])]
                s, paired = row["first_output_s"], row["first_output_paired_over_warm_local"]
                writer = row.get("first_output_paired_over_cold")
                want = [f"{row['ok']}/{row['runs']}", f"{s['median']:.2f} ({s['min']:.2f}–{s['max']:.2f})",
                        f"{row['compile_s']['median']:.2f}", f"{paired['median']:.2f}" if paired else "–",
                        f"{writer['median']:.3f}, {row['compile_paired_over_cold']['median']:.3f}" if writer else "–"]  # fmt: skip
                assert cells[2:] == want, (title, cells)
                checked += 1
    assert checked >= 356
