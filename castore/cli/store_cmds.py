"""Commands on the store itself: put, get, ls, stat, rm, verify, du, config."""

from __future__ import annotations

import datetime as _dt
import os
from collections import Counter
from typing import Any

import click

from castore.cli.common import (
    EXIT_VERIFY,
    Miss,
    VerificationFailed,
    _binary_stream,
    cli_config,
    emit,
    human_size,
    json_mode,
    json_option,
    open_cli_store,
    progress_bar,
)
from castore.errors import FormatError

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


@click.command()
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


@click.command()
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


@click.command("ls")
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


@click.command("stat")
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


@click.command("rm")
@click.argument("namespace")
@click.argument("key", required=False)
@json_option
@click.pass_context
def rm(ctx: click.Context, namespace: str, key: str | None, as_json: bool) -> None:
    """Remove a key, or with no KEY every key of NAMESPACE (chunks stay until `castore gc`: others may share them)."""
    store = open_cli_store(ctx)
    if key is None:
        from castore.format.keys import validate_namespace
        from castore.gc import delete_namespace

        validate_namespace(namespace)
        removed = delete_namespace(store, namespace)
        if not removed:
            raise Miss(f"{namespace}: no such namespace")
        emit(ctx, {"namespace": namespace, "deleted": removed}, lambda s: f"removed {removed} keys of {namespace}")
        return
    if not store.delete(namespace, key):
        raise Miss(f"{namespace}/{key}: no such key")
    emit(ctx, {"namespace": namespace, "key": key, "deleted": True}, lambda s: f"removed {namespace}/{key}")


@click.command()
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


@click.command()
@click.argument("namespace", required=False)
@json_option
@click.pass_context
def du(ctx: click.Context, namespace: str | None, as_json: bool) -> None:
    """Show logical bytes (what was put) against stored bytes (after dedup and compression).

    Without NAMESPACE, also what a listing of the bucket shows: chunk objects that keys reference, and
    garbage (chunk objects no key references, which `castore gc` removes).
    """
    store = open_cli_store(ctx)
    usage = store.du(namespace)
    data: dict[str, Any] = {
        "namespace": namespace,
        "manifests": usage.manifests,
        "logical_bytes": usage.logical_bytes,
        "referenced_bytes": usage.referenced_bytes,
        "stored_bytes": usage.stored_bytes,
        "chunk_objects": usage.chunk_objects,
        "dedup_ratio": round(usage.dedup_ratio, 4),
        "compression_ratio": round(usage.compression_ratio, 4),
    }
    if namespace is None:
        from castore.gc import bucket_usage

        data["bucket"] = bucket_usage(store).to_dict()

    def render(d: dict[str, Any]) -> str:
        lines = [
            f"keys:              {d['manifests']}",
            f"logical:           {human_size(d['logical_bytes'])} ({d['logical_bytes']} bytes)",
            f"after dedup:       {human_size(d['referenced_bytes'])} in {d['chunk_objects']} chunks",
            f"stored:            {human_size(d['stored_bytes'])} ({d['stored_bytes']} bytes, manifests included)",
            f"dedup ratio:       {d['dedup_ratio']:.2f}x",
            f"overall ratio:     {d['compression_ratio']:.2f}x (logical / stored)",
        ]
        b = d.get("bucket")
        if b:
            lines += [
                "in the bucket (listing):",
                f"  total:           {human_size(b['total_bytes'])} ({b['total_bytes']} bytes)",
                f"  manifests:       {b['manifests']} objects, {human_size(b['manifest_bytes'])}",
                f"  referenced:      {b['referenced_objects']} chunk objects, {human_size(b['referenced_bytes'])}",
                f"  garbage:         {b['garbage_objects']} chunk objects, {human_size(b['garbage_bytes'])} (castore gc removes them)",
            ]
            if b["missing_chunks"]:
                lines.append(f"  missing:         {b['missing_chunks']} chunks that keys name are absent (castore verify)")
            if b["other_objects"]:
                lines.append(f"  other objects:   {b['other_objects']}, {human_size(b['other_bytes'])}")
        return "\n".join(lines)

    emit(ctx, data, render)


@click.command("config")
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



COMMANDS = [put, get, ls, stat_cmd, rm, verify, du, config_cmd]
