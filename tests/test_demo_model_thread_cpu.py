"""The measured process's per-thread CPU accounting (``castore.bench.counters.ThreadCpu``): the seconds castore's
threads take from the interpreter that the main thread's tracing shares, ended threads and live ones alike."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, threading, time
    from castore.bench.counters import ThreadCpu

    def spin(seconds):
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    meter = ThreadCpu()
    meter.install()
    for n in range(2):  # two pool workers that have ended: one name, their seconds added
        t = threading.Thread(target=spin, args=(0.15,), name=f"castore_{n}")
        t.start()
        t.join()
    release, busy = threading.Event(), threading.Event()
    live = threading.Thread(target=lambda: (spin(0.2), busy.set(), release.wait()), name="castore-prefetch")
    live.start()
    busy.wait()
    time.sleep(0.05)
    idle = threading.Thread(target=release.wait, name="Thread-7")  # alive, no CPU to speak of
    idle.start()
    snapshot = meter.snapshot()
    release.set()
    print(json.dumps(snapshot))
    """
)


def test_thread_cpu_counts_ended_and_live_threads_by_name_without_pool_numbers():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True)
    snapshot = json.loads(out.stdout)
    assert 0.28 <= snapshot["castore"] < 1.0  # castore_0 and castore_1, 0.15 s each, counted as they ended
    assert 0.18 <= snapshot["castore-prefetch"] < 1.0  # still running: read from /proc at its tick
    assert snapshot["Thread"] < 0.05
    assert "MainThread" not in snapshot
