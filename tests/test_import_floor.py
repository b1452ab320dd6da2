"""benchmarks/import_floor.py: how the interpreter's import timings are read into per-process totals."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _floor():  # noqa: ANN202 - the benchmark module
    spec = importlib.util.spec_from_file_location("import_floor", ROOT / "benchmarks" / "import_floor.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["import_floor"] = module
    spec.loader.exec_module(module)
    return module


# What -X importtime printed for a process where a thread of castore imported a backend while the main thread
# imported torch, and another thread waited on torch's import lock: the waiting thread's line for torch comes
# last and holds the wait; the backend's line carries the negative remainder of the shared account.
STDERR = """\
import time: self [us] | cumulative | imported package
import time:       500 |        500 | site
import time:     15000 |     900000 | torch
import time:    758000 |     758000 |   torch
import time:   -800000 |       1300 | castore.backends.file
import time:    820000 |     820000 | torch._dynamo
Traceback lines and other output are not import lines
"""


def test_a_module_reported_twice_counts_at_its_first_report() -> None:
    floor = _floor()
    times = floor.module_times(floor.import_lines(STDERR))
    assert times == {"site": 0.0005, "torch": 0.015, "castore.backends.file": -0.8, "torch._dynamo": 0.82}


def test_the_process_total_keeps_every_line_so_seconds_shifted_between_threads_cancel() -> None:
    floor = _floor()
    lines = floor.import_lines(STDERR)
    assert len(lines) == 5
    assert round(sum(s for _, s in lines), 4) == 0.7935  # 0.5 ms + 15 + 758 - 800 + 820


def test_modules_only_one_mode_imports_are_those_every_process_of_it_imported() -> None:
    floor = _floor()
    mine = [{"a": 0.1, "b": 0.2, "shared": 1.0}, {"a": 0.3, "shared": 1.0}]
    theirs = [{"shared": 0.9, "c": 0.5}]
    only = floor.only_in(mine, theirs)
    assert only == {"modules": 1, "seconds": 0.2, "largest": [["a", 0.2]]}
