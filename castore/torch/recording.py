"""What a process under ``castore prewarm`` read or wrote, for the bundle it publishes.

With CASTORE_RECORD_DIR set, every process of the job (compile workers included) appends one JSON line
``[namespace, key]`` per store entry it used to a file of its own in that directory, as it uses it: a process that
dies before its exit hooks run still leaves what it needed on record, and ``castore prewarm`` then finds what it
failed to publish instead of publishing an incomplete bundle.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

log = logging.getLogger("castore.torch")

RECORD_DIR_ENV = "CASTORE_RECORD_DIR"
SUFFIX = ".entries"


class TouchRecorder:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._seen: set[tuple[str, str]] = set()
        self._fd: int | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls) -> TouchRecorder | None:
        directory = os.environ.get(RECORD_DIR_ENV)
        return cls(directory) if directory else None

    def note(self, namespace: str, key: str) -> None:
        """Record one entry (once per process). Never raises."""
        entry = (namespace, key)
        with self._lock:
            if entry in self._seen:
                return
            self._seen.add(entry)
            try:
                if self._fd is None:
                    path = os.path.join(self.directory, f"{os.getpid()}-{time.time_ns()}{SUFFIX}")
                    self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.write(self._fd, (json.dumps([namespace, key]) + "\n").encode())
            except OSError as exc:
                log.warning("castore: cannot record entry for the bundle in %s: %s", self.directory, exc)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def read_records(directory: str) -> list[tuple[str, str]]:
    """Every entry the job's processes recorded, in first-use order, without repeats."""
    entries: dict[tuple[str, str], None] = {}
    for name in sorted(os.listdir(directory)):
        if not name.endswith(SUFFIX):
            continue
        with open(os.path.join(directory, name)) as f:
            for line in f:
                try:
                    ns, key = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a process killed mid-write
                entries[(str(ns), str(key))] = None
    return list(entries)
