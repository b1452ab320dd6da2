"""What every command module shares: exit codes, the error-mapping group, the per-invocation config and store,
output (text or --json), progress bars and logging. Command modules import this and nothing of each other."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from castore.errors import (
    BackendError,
    CastoreError,
    ConfigError,
    FormatError,
    InvalidKeyError,
    KeyExistsError,
    ReadOnlyError,
)


EXIT_OK = 0
EXIT_MISS = 1
EXIT_USAGE = 2
EXIT_VERIFY = 3
EXIT_BACKEND = 4
EXIT_READ_ONLY = 5

EPILOG = """\b
Exit codes:
  0  success
  1  miss: the key (or namespace) does not exist (get, stat, rm, verify KEY)
  2  usage error or bad input (invalid key or namespace, bad configuration, unreadable path)
  3  verification failed: verify found bad chunks (verify --repair: problems it could not fix),
     or stored data is corrupt or untrusted, or a stored tree cannot be restored safely
  4  backend error (network, permissions, server error)
  5  the store is read-only and the command writes

\b
Configuration comes from options, then CASTORE_* environment variables, then ./castore.toml,
./pyproject.toml [tool.castore], $XDG_CONFIG_HOME/castore/config.toml; `castore config` shows
the effective values and where each came from.
"""

log = logging.getLogger("castore.cli")


class Miss(CastoreError):
    """The requested key does not exist (exit code 1)."""


class VerificationFailed(CastoreError):
    """verify found problems (exit code 3)."""


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, Miss):
        return EXIT_MISS
    if isinstance(exc, ReadOnlyError):
        return EXIT_READ_ONLY
    if isinstance(exc, BackendError):
        return EXIT_BACKEND
    if isinstance(exc, (VerificationFailed, FormatError)):
        return EXIT_VERIFY
    if isinstance(exc, (InvalidKeyError, ConfigError, KeyExistsError, OSError)):
        return EXIT_USAGE
    return EXIT_MISS if isinstance(exc, CastoreError) else EXIT_USAGE


class CastoreGroup(click.Group):
    """A click group that maps castore's errors, in every subcommand, to one stderr line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (CastoreError, OSError) as exc:
            verbose = bool(ctx.obj and ctx.obj.get("verbose"))
            if verbose:
                import traceback

                traceback.print_exception(exc, file=sys.stderr)
            message = str(exc) or type(exc).__name__
            if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in message:
                message = f"{exc.filename}: {message}"
            click.echo(f"castore: error: {message}", err=True)
            ctx.exit(exit_code_for(exc))


# -- helpers other command modules can use --------------------------------------------------------------
def _state(ctx: click.Context) -> dict[str, Any]:
    root = ctx.find_root()
    if root.obj is None:
        root.obj = {}
    return root.obj


def cli_config(ctx: click.Context) -> Any:
    """The effective Config for this invocation (global options > environment > files > defaults)."""
    from castore.config import load_config

    state = _state(ctx)
    if "config" not in state:
        state["config"] = load_config(state.get("overrides") or {})
    return state["config"]


def open_cli_store(ctx: click.Context) -> Any:
    """Open (once per invocation) the store the global options and configuration name; closed on exit."""
    state = _state(ctx)
    if "store" not in state:
        from castore import open_store

        store = open_store(config=cli_config(ctx))
        state["store"] = store
        ctx.find_root().call_on_close(store.close)
    return state["store"]


def json_mode(ctx: click.Context) -> bool:
    return bool(ctx.params.get("as_json")) or bool(_state(ctx).get("json"))


def emit(ctx: click.Context, data: Any, render: Callable[[Any], str] | None = None) -> None:
    """Print data as JSON (with --json) or as text (render(data), default: str)."""
    if json_mode(ctx):
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        text = render(data) if render else str(data)
        if text:
            click.echo(text)


@contextmanager
def progress_bar(ctx: click.Context, total: int | None, desc: str) -> Iterator[Callable[[int], None] | None]:
    """A tqdm bar on stderr that appears only if the transfer lasts more than a second.

    Yields None (no bar) under --json or when stderr is not a terminal.
    """
    if json_mode(ctx) or not _stderr_is_tty():
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, delay=1.0, file=sys.stderr, leave=False)
    try:
        yield bar.update
    finally:
        bar.close()


def _binary_stream(name: str) -> Any:
    """The binary side of sys.stdin / sys.stdout (whatever they are now: test runners swap them)."""
    stream = getattr(sys, name)
    return getattr(stream, "buffer", stream)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def human_size(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")


class _LogHandler(logging.StreamHandler):
    """castore's log lines go to whatever sys.stderr is when they are emitted (test runners swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _setup_logging(verbose: int) -> None:
    logger = logging.getLogger("castore")
    for handler in list(logger.handlers):
        if isinstance(handler, _LogHandler):
            logger.removeHandler(handler)
    handler = _LogHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("castore: %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)

