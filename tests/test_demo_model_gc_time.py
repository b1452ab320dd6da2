"""The measured process's garbage-collector accounting (``castore.bench.counters.GcTime``) and the main thread's
own CPU seconds in ``cpu_seconds()``: what tells a heavier heap or a busier main thread apart from contention."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

SCRIPT = textwrap.dedent(
    """
    import gc, json, threading, time
    from castore.bench.counters import GcTime, cpu_seconds

    meter = GcTime()
    meter.install()
    before = meter.snapshot(count_objects=False)
    keep = [[i] for i in range(300_000)]  # tracked containers: a full collection must walk them
    for _ in range(3):
        gc.collect()
    gc.collect(0)
    after = meter.snapshot()

    def spin(seconds):
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    worker = threading.Thread(target=spin, args=(0.3,))
    worker.start()
    worker.join()
    spin(0.2)
    print(json.dumps({"before": before, "after": after, "cpu": cpu_seconds()}))
    """
)


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    """One run of the script, read by both tests."""
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_gc_time_counts_collections_by_generation_and_the_objects_tracked(report: dict[str, Any]):
    before, after = report["before"], report["after"]
    assert "tracked_objects" not in before  # left out on request: it walks the heap
    assert after["collections"][2] >= before["collections"][2] + 3  # the three full collections
    assert after["collections"][0] >= before["collections"][0] + 1
    assert after["seconds_by_generation"][2] > 0
    assert after["seconds"] >= sum(after["seconds_by_generation"]) - 0.003
    assert after["tracked_objects"] >= 300_000


def test_cpu_seconds_reports_the_main_threads_own_time_apart_from_other_threads(report: dict[str, Any]):
    cpu = report["cpu"]
    assert cpu["main_thread"] >= 0.2
    assert cpu["self"] >= cpu["main_thread"] + 0.25  # the worker's 0.3 s is the process's, not the main thread's
