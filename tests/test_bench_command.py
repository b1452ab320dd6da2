"""`castore bench` as a user meets it: its exit status, where it writes and says it wrote, its chart without
matplotlib, and what its report and help say. Fast: the measured processes here are an interpreter that fails at
once (``--python /bin/false``), and the chart test rebuilds a committed report."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from castore.cli import main as cli_main

REPO = Path(__file__).resolve().parent.parent
COMMITTED_CPU_REPORT = REPO / "benchmarks" / "results" / "cpu-2core-x86_64" / "hot_load.json"
# What a user-facing text must not carry: how the software was developed rather than what it does.
DEVELOPMENT_HISTORY = re.compile(r"\bissue\s*#?\d+|\(issue|\bsession \d+|\bthis stop\b|\bearlier code\b|other engineers", re.I)


def _castore(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "castore", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def block_import_env(tmp_path: Path, module: str) -> dict[str, str]:
    """An environment whose Python processes cannot import ``module``: a sitecustomize on PYTHONPATH puts a
    finder in front of the import system that refuses it, as an interpreter without the package would."""
    site = tmp_path / f"no-{module}"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""
            import sys

            class _Refuse:
                def find_spec(self, name, path=None, target=None):
                    if name == {module!r} or name.startswith({module!r} + "."):
                        raise ModuleNotFoundError("No module named " + repr(name), name=name)
                    return None

            sys.meta_path.insert(0, _Refuse())
            """
        )
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    return env


@pytest.fixture(scope="module")
def failed_bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """A benchmark whose every measured process fails, run with no --out from a scratch directory."""
    cwd = tmp_path_factory.mktemp("bench-cwd")
    proc = _castore(
        ["bench", "--python", "/bin/false", "--device", "cpu", "--models", "mlp:infer", "--modes", "cold,warm-local",
         "--repeats", "1", "--work-dir", str(cwd)],
        cwd,
    )  # fmt: skip
    return proc, cwd


def test_bench_exits_nonzero_when_every_measured_process_failed(failed_bench) -> None:  # noqa: ANN001
    proc, _ = failed_bench
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "every measured mode failed" in proc.stderr
    assert "| mlp:infer | cold | 0/1 |" in proc.stdout  # the report is still printed and written


def test_bench_writes_to_its_documented_default_and_says_where(failed_bench) -> None:  # noqa: ANN001
    proc, cwd = failed_bench
    assert not (cwd / "benchmarks").exists()  # never into a benchmarks/results of whatever directory it runs in
    [out] = list((cwd / "castore-bench").iterdir())
    assert out.name.startswith("cpu-")
    assert (out / "hot_load.json").is_file() and (out / "hot_load.md").is_file()
    assert f"wrote {out / 'hot_load.json'}, {out / 'hot_load.md'}" in proc.stderr
    help_text = _castore(["bench", "--help"], cwd).stdout
    assert "castore-bench/<machine slug>" in " ".join(help_text.split())


def test_bench_report_carries_no_note_unless_given_one(failed_bench) -> None:  # noqa: ANN001
    proc, cwd = failed_bench
    [out] = list((cwd / "castore-bench").iterdir())
    report = json.loads((out / "hot_load.json").read_text())
    assert report["note"] == ""
    assert "Note:" not in (out / "hot_load.md").read_text()


def test_bench_without_matplotlib_says_the_chart_was_skipped_and_why(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(COMMITTED_CPU_REPORT, results / "hot_load.json")
    proc = _castore(["bench", "--rebuild", str(results)], tmp_path, env=block_import_env(tmp_path, "matplotlib"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (results / "hot_load.png").exists()
    assert "hot_load.png" not in proc.stderr.split("chart skipped")[0]  # not among what it says it wrote
    assert "chart skipped: matplotlib is not installed" in proc.stderr
    assert json.loads((results / "hot_load.json").read_text())["files"]["chart"] is None


def test_no_help_text_speaks_of_development_history(tmp_path: Path) -> None:
    texts = {"castore": CliRunner().invoke(cli_main, ["--help"]).output}
    for name in cli_main.commands:
        if name != "bench":
            texts[name] = CliRunner().invoke(cli_main, [name, "--help"]).output
    texts["bench"] = _castore(["bench", "--help"], tmp_path).stdout
    texts["demo_model"] = subprocess.run(
        [sys.executable, "-m", "castore.bench.demo_model", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    assert all(text.strip() for text in texts.values()), texts
    assert {name: DEVELOPMENT_HISTORY.findall(text) for name, text in texts.items() if DEVELOPMENT_HISTORY.search(text)} == {}


def test_bench_runs_each_mode_with_its_reference_and_the_writer_alone_without_warm_local() -> None:
    from castore.bench.modes import modes_to_run

    assert modes_to_run(["castore-aot"]) == ["cold", "warm-local", "castore-aot"]
    assert modes_to_run(["cold-writer", "castore-hot"]) == ["cold", "cold-writer", "warm-local", "castore-hot"]
    assert modes_to_run(["cold-writer"]) == modes_to_run(["cold", "cold-writer"]) == ["cold", "cold-writer"]
    with pytest.raises(ValueError, match="unknown modes: hot"):
        modes_to_run(["hot"])
