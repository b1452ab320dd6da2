"""The ``castore`` command line.

Every command is attached to the :data:`main` group. Other modules add theirs the same way::

    from castore.cli import main, open_cli_store, emit

    @click.command("stats")
    @click.pass_context
    def stats(ctx): ...

    main.add_command(stats)

Errors derived from :class:`castore.errors.CastoreError` raised inside any command (added here or
elsewhere) are turned into one line on stderr and the documented exit code by :class:`CastoreGroup`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import sys
from collections import Counter
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

# Exit codes (documented in the --help epilog; scripts rely on them).
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
  3  verification failed: verify found bad chunks, or stored data is corrupt
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


# -- the group ------------------------------------------------------------------------------------------
@click.group(cls=CastoreGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", metavar="URL", help="Store URL: file:///path, s3://bucket/prefix?endpoint=..., memory://name.")
@click.option("--cache-dir", metavar="DIR", help="Directory of the node-local read-through layer.")
@click.option("--read-only", is_flag=True, default=None, help="Refuse every write.")
@click.option("-v", "--verbose", count=True, help="Log what castore does (and show tracebacks).")
@click.version_option(package_name="castore", prog_name="castore")
@click.pass_context
def main(ctx: click.Context, url: str | None, cache_dir: str | None, read_only: bool | None, verbose: int) -> None:
    """castore: a content-addressed store for torch.compile artifacts on S3-compatible storage."""
    _setup_logging(verbose)
    state = _state(ctx)
    state["verbose"] = verbose
    state["overrides"] = {"url": url, "cache_dir": cache_dir, "read_only": read_only}


# -- put / get --------------------------------------------------------------------------------------------
def _parse_meta(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}")
        out[name] = value
    return out


def _put_summary(result: Any) -> dict[str, Any]:
    m = result.manifest
    return {
        "namespace": m.namespace,
        "key": m.key,
        "kind": m.kind,
        "size": m.size,
        "digest": m.digest.hex(),
        "published": result.published,
        "chunks": len(m.chunks) if m.inline is None else 0,
        "inline": m.inline is not None,
        "chunks_uploaded": result.chunks_uploaded,
        "bytes_uploaded": result.bytes_uploaded,
    }


@main.command()
@click.argument("namespace")
@click.argument("key")
@click.argument("path", type=click.Path(exists=True, allow_dash=True, path_type=str))
@click.option("--force", "-f", is_flag=True, help="Replace the key if it already exists (default: first writer wins).")
@click.option("--meta", "meta", multiple=True, metavar="K=V", callback=_parse_meta, help="Attach metadata (repeatable).")
@json_option
@click.pass_context
def put(ctx: click.Context, namespace: str, key: str, path: str, force: bool, meta: dict[str, str], as_json: bool) -> None:
    """Store PATH (a file, a directory tree, or - for stdin) under NAMESPACE KEY.

    Without --force an existing key is kept and the command says so (exit code 0).
    """
    from castore.format.keys import validate_key, validate_namespace

    validate_namespace(namespace)
    validate_key(key)
    store = open_cli_store(ctx)
    if path == "-":
        data = _binary_stream("stdin").read()
        with progress_bar(ctx, len(data), f"put {key}") as progress:
            result = store.put(namespace, key, data, meta=meta, overwrite=force, progress=progress)
    elif os.path.isdir(path):
        from castore.format.tree import scan_tree

        total = sum(e.size for e in scan_tree(path) if e.type == "f")
        with progress_bar(ctx, total, f"put {key}") as progress:
            result = store.put_tree(namespace, key, path, meta=meta, overwrite=force, progress=progress)
    else:
        with progress_bar(ctx, os.path.getsize(path), f"put {key}") as progress:
            result = store.put_file(namespace, key, path, meta=meta, overwrite=force, progress=progress)
    summary = _put_summary(result)

    def render(s: dict[str, Any]) -> str:
        if not s["published"]:
            return ""
        how = "inline" if s["inline"] else f"{s['chunks']} chunks, {s['chunks_uploaded']} new"
        return f"{s['namespace']}/{s['key']}: {s['kind']} of {human_size(s['size'])} ({how}, {human_size(s['bytes_uploaded'])} uploaded)"

    if not result.published:
        click.echo(f"castore: {namespace}/{key} already exists; kept the existing entry (use --force to replace it)", err=True)
    emit(ctx, summary, render)


@main.command()
@click.argument("namespace")
@click.argument("key")
@click.argument("dest", required=False, type=click.Path(allow_dash=True, path_type=str))
@json_option
@click.pass_context
def get(ctx: click.Context, namespace: str, key: str, dest: str | None, as_json: bool) -> None:
    """Fetch NAMESPACE KEY into DEST (a file, a directory for trees, or - for stdout).

    DEST defaults to the stored file name (or the key) in the current directory. A blob fetched into an
    existing directory lands in it under its stored file name.
    """
    store = open_cli_store(ctx)
    manifest = store.stat(namespace, key)
    if manifest is None:
        raise Miss(f"{namespace}/{key}: no such key")
    filename = manifest.meta.get("filename")
    default_name = filename if isinstance(filename, str) and filename and "/" not in filename and filename not in (".", "..") else key
    if dest is None:
        dest = key if manifest.kind == "tree" else default_name
    if dest == "-":
        if json_mode(ctx):
            raise click.UsageError("--json cannot be combined with DEST '-' (stdout carries the data)")
        if manifest.kind == "tree":
            raise click.UsageError(f"{namespace}/{key} is a directory tree; give a destination directory")
        with progress_bar(ctx, manifest.size, f"get {key}") as progress:
            data = store.get(namespace, key, progress=progress)
        if data is None:
            raise VerificationFailed(f"{namespace}/{key}: stored data is missing or corrupt (see warnings)")
        out = _binary_stream("stdout")
        out.write(data)
        out.flush()
        return
    with progress_bar(ctx, manifest.size, f"get {key}") as progress:
        if manifest.kind == "tree":
            ok = store.get_tree(namespace, key, dest, progress=progress)
        else:
            if os.path.isdir(dest):
                dest = os.path.join(dest, default_name)
            ok = store.get_file(namespace, key, dest, progress=progress)
    if not ok:
        if not store.contains(namespace, key):
            raise Miss(f"{namespace}/{key}: no such key")
        raise VerificationFailed(f"{namespace}/{key}: stored data is missing or corrupt (see warnings)")
    emit(
        ctx,
        {"namespace": namespace, "key": key, "kind": manifest.kind, "size": manifest.size, "dest": os.path.abspath(dest)},
        lambda s: f"{s['namespace']}/{s['key']} -> {dest} ({human_size(s['size'])})",
    )


# -- listing and inspecting -------------------------------------------------------------------------------
def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="seconds")


def manifest_summary(m: Any) -> dict[str, Any]:
    from castore.format import codec as codecs

    if m.inline is not None:
        codec_mix = {codecs.codec_of(m.inline): 1}
    else:
        codec_mix = dict(Counter(c.codec for c in m.chunks))
    out = {
        "namespace": m.namespace,
        "key": m.key,
        "kind": m.kind,
        "size": m.size,
        "digest": m.digest.hex(),
        "chunks": 0 if m.inline is not None else len(m.chunks),
        "inline": m.inline is not None,
        "stored_size": m.stored_size,
        "codecs": codec_mix,
        "meta": m.meta,
        "created": _iso(m.created),
        "writer": m.writer,
    }
    if m.chunker is not None:
        out["chunker"] = m.chunker.to_wire()
    if m.kind == "tree":
        out["files"] = sum(1 for e in m.files if e.type == "f")
        out["directories"] = sum(1 for e in m.files if e.type == "d")
    if m.refs:
        out["refs"] = [list(r) for r in m.refs]
    return out


@main.command("ls")
@click.argument("namespace", required=False)
@click.option("-l", "--long", "long_", is_flag=True, help="Also show kind, size and creation time (reads each manifest).")
@json_option
@click.pass_context
def ls(ctx: click.Context, namespace: str | None, long_: bool, as_json: bool) -> None:
    """List keys (of NAMESPACE, or of every namespace)."""
    store = open_cli_store(ctx)
    rows: list[dict[str, Any]] = []
    for ns, key, msize in store.list(namespace):
        row: dict[str, Any] = {"namespace": ns, "key": key, "manifest_bytes": msize}
        if long_:
            try:
                m = store.stat(ns, key)
            except FormatError as exc:
                row["error"] = str(exc)
                m = None
            if m is not None:
                row.update(kind=m.kind, size=m.size, created=_iso(m.created))
        rows.append(row)

    def render(rows: list[dict[str, Any]]) -> str:
        lines = []
        for r in rows:
            if long_:
                if "size" in r:
                    lines.append(f"{r['kind']:6} {r['size']:>12} {r['created']}  {r['namespace']}/{r['key']}")
                else:
                    lines.append(f"{'?':6} {'?':>12} {'?':25}  {r['namespace']}/{r['key']}  ({r.get('error', 'vanished')})")
            else:
                lines.append(f"{r['namespace']}/{r['key']}")
        return "\n".join(lines)

    emit(ctx, rows, render)


@main.command("stat")
@click.argument("namespace")
@click.argument("key")
@json_option
@click.pass_context
def stat_cmd(ctx: click.Context, namespace: str, key: str, as_json: bool) -> None:
    """Show a key's manifest: kind, size, chunks, stored size, codec mix, metadata, creation time."""
    store = open_cli_store(ctx)
    manifest = store.stat(namespace, key)
    if manifest is None:
        raise Miss(f"{namespace}/{key}: no such key")

    def render(s: dict[str, Any]) -> str:
        lines = [
            f"key:         {s['namespace']}/{s['key']}",
            f"kind:        {s['kind']}",
            f"size:        {s['size']} ({human_size(s['size'])})",
            f"digest:      sha256:{s['digest']}",
            f"chunks:      {'inline' if s['inline'] else s['chunks']}",
            f"stored size: {s['stored_size']} ({human_size(s['stored_size'])})",
            f"codecs:      {', '.join(f'{k}={v}' for k, v in sorted(s['codecs'].items()))}",
            f"created:     {s['created']}",
            f"writer:      {s['writer']}",
        ]
        if "files" in s:
            lines.append(f"files:       {s['files']} files, {s['directories']} directories")
        lines.append("meta:")
        lines.extend(f"  {k} = {v!r}" for k, v in sorted(s["meta"].items()))
        return "\n".join(lines)

    emit(ctx, manifest_summary(manifest), render)


@main.command("rm")
@click.argument("namespace")
@click.argument("key")
@json_option
@click.pass_context
def rm(ctx: click.Context, namespace: str, key: str, as_json: bool) -> None:
    """Remove a key (its chunks stay: other keys may share them)."""
    store = open_cli_store(ctx)
    if not store.delete(namespace, key):
        raise Miss(f"{namespace}/{key}: no such key")
    emit(ctx, {"namespace": namespace, "key": key, "deleted": True}, lambda s: f"removed {namespace}/{key}")


@main.command()
@click.argument("namespace", required=False)
@click.argument("key", required=False)
@json_option
@click.pass_context
def verify(ctx: click.Context, namespace: str | None, key: str | None, as_json: bool) -> None:
    """Re-hash every chunk of KEY, of NAMESPACE, or of the whole store. Exit code 3 if anything is bad."""
    from castore.format.keys import validate_key, validate_namespace

    store = open_cli_store(ctx)
    if namespace is not None:
        validate_namespace(namespace)
    if key is not None:
        validate_key(key)
        if not store.contains(namespace, key):
            raise Miss(f"{namespace}/{key}: no such key")
    report = store.verify(namespace, key)
    data = {"ok": report.ok, "manifests": report.manifests, "chunks": report.chunks, "bytes": report.bytes, "bad": report.bad}

    def render(d: dict[str, Any]) -> str:
        lines = [f"bad: {b}" for b in d["bad"]]
        lines.append(
            f"{'OK' if d['ok'] else 'FAILED'}: {d['manifests']} manifests, {d['chunks']} chunks, "
            f"{human_size(d['bytes'])} checked, {len(d['bad'])} problems"
        )
        return "\n".join(lines)

    emit(ctx, data, render)
    if not report.ok:
        ctx.exit(EXIT_VERIFY)


@main.command()
@click.argument("namespace", required=False)
@json_option
@click.pass_context
def du(ctx: click.Context, namespace: str | None, as_json: bool) -> None:
    """Show logical bytes (what was put) against stored bytes (after dedup and compression)."""
    store = open_cli_store(ctx)
    usage = store.du(namespace)
    data = {
        "namespace": namespace,
        "manifests": usage.manifests,
        "logical_bytes": usage.logical_bytes,
        "referenced_bytes": usage.referenced_bytes,
        "stored_bytes": usage.stored_bytes,
        "chunk_objects": usage.chunk_objects,
        "dedup_ratio": round(usage.dedup_ratio, 4),
        "compression_ratio": round(usage.compression_ratio, 4),
    }

    def render(d: dict[str, Any]) -> str:
        return "\n".join(
            [
                f"keys:              {d['manifests']}",
                f"logical:           {human_size(d['logical_bytes'])} ({d['logical_bytes']} bytes)",
                f"after dedup:       {human_size(d['referenced_bytes'])} in {d['chunk_objects']} chunks",
                f"stored:            {human_size(d['stored_bytes'])} ({d['stored_bytes']} bytes, manifests included)",
                f"dedup ratio:       {d['dedup_ratio']:.2f}x",
                f"overall ratio:     {d['compression_ratio']:.2f}x (logical / stored)",
            ]
        )

    emit(ctx, data, render)


@main.command("config")
@json_option
@click.pass_context
def config_cmd(ctx: click.Context, as_json: bool) -> None:
    """Show the effective configuration and where each value came from."""
    cfg = cli_config(ctx)
    rows = [{"name": name, "value": value, "source": source} for name, value, source in cfg.describe()]
    if json_mode(ctx):
        emit(ctx, {r["name"]: {"value": r["value"], "source": r["source"]} for r in rows})
        return
    width = max(len(r["name"]) for r in rows)
    emit(ctx, rows, lambda rs: "\n".join(f"{r['name']:<{width}}  {r['value']!s:<40}  ({r['source']})" for r in rs))


# torch.compile commands (run, stats, demo) live in their own module and attach themselves to `main`.
import castore.cli_torch  # noqa: E402,F401
import castore.cli_bench  # noqa: E402,F401

if __name__ == "__main__":  # pragma: no cover
    main(prog_name="castore")
