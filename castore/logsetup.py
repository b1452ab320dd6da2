"""The ``log`` setting (CASTORE_LOG): castore's messages on stderr, one line each, naming the process.

A torch job runs castore in many processes (the training script, Inductor's compile workers, data loaders), all
writing to one stderr: each line carries its process id.
"""

from __future__ import annotations

import logging
import sys


class _SettingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler the ``log`` setting adds (told apart from a program's own handlers)."""


def apply_log_setting(level: str) -> None:
    """Send the ``castore`` logger's records at ``level`` and above to stderr; '' leaves logging as it is.

    Idempotent: a second call replaces the level. Records still propagate to the program's own handlers."""
    if not level:
        return
    logger = logging.getLogger("castore")
    handler = next((h for h in logger.handlers if isinstance(h, _SettingHandler)), None)
    if handler is None:
        handler = _SettingHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s [pid %(process)d] %(message)s"))
        logger.addHandler(handler)
    numeric = getattr(logging, level.upper())
    handler.setLevel(numeric)
    if logger.level == logging.NOTSET or logger.level > numeric:
        logger.setLevel(numeric)
