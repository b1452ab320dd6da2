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

    Names and modes are never taken from the bucket unasked: without DEST the entry is written to ./KEY
    (a file with the mode a new file gets, or a directory tree); a blob fetched into an existing directory
    lands in it as KEY. A file written to a DEST keeps its stored permission bits, and a tree its files'
    bits, without setuid/setgid/sticky and group/world write. A tree is restored only with regular files and
    directories strictly inside DEST; every entry is checked before anything is written.
    """
    from castore.format.keys import validate_key, validate_namespace

    validate_namespace(namespace)
    validate_key(key)  # a valid key is a safe file name: no separator, no '..', at most 250 bytes
    store = open_cli_store(ctx)
    manifest = store.lookup(namespace, key)
    if manifest is None:
        if store.contains(namespace, key):
            raise VerificationFailed(f"{namespace}/{key}: the stored manifest is unusable (see warnings)")
        raise Miss(f"{namespace}/{key}: no such key")
    keep_mode = dest is not None
    if dest is None:
        dest = key
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
                dest = os.path.join(dest, key)
            ok = store.get_file(namespace, key, dest, progress=progress, keep_mode=keep_mode)
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
    found = store.inspect(namespace, key)
    if found is None:
        raise Miss(f"{namespace}/{key}: no such key")
    manifest, verdict, version = found
    summary = manifest_summary(manifest)
    summary.update(format=version, signed_by=list(verdict.signers), trusted=verdict.trusted, trust=verdict.reason)

    def render(s: dict[str, Any]) -> str:
        lines = [
            f"key:         {s['namespace']}/{s['key']}",
            f"format:      {s['format']}",
            f"signed by:   {', '.join(s['signed_by']) or '-'}",
            f"trusted:     {'yes' if s['trusted'] else 'NO'} ({s['trust']})",
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
        meta = s["meta"]
        if meta.get("artifact") == "aot-function":  # an ahead-of-time compiled function (castore.torch.precompiled)
            lines.append(f"function:    {meta.get('aot.target', '?')}")
            if "aot.unserializable" in meta:
                lines.append(f"not serializable: {meta['aot.unserializable']}")
            else:
                lines.append(f"guards kept:    {meta.get('aot.guards_kept', '?')}")
                lines.append(f"guards dropped: {meta.get('aot.guards_dropped', '?')}")
                if "aot.global_state" in meta:
                    lines.append(f"global state checked by: {meta['aot.global_state']}")
        lines.append("meta:")
        lines.extend(f"  {k} = {v!r}" for k, v in sorted(meta.items()))
        return "\n".join(lines)

    emit(ctx, summary, render)


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
@click.option("--repair", is_flag=True, help="Upload bad chunks again from this node's local layer; delete what "
              "cannot be repaired and the entries that need it (the next writer publishes them again).")
@json_option
@click.pass_context
def verify(ctx: click.Context, namespace: str | None, key: str | None, repair: bool, as_json: bool) -> None:
    """Re-hash every chunk of KEY, of NAMESPACE, or of the whole store, as the bucket holds them.

    Exit code 3 if anything is bad; with --repair, 0 once every problem was repaired or removed.
    """
    from castore.format.keys import validate_key, validate_namespace

    store = open_cli_store(ctx)
    if namespace is not None:
        validate_namespace(namespace)
    if key is not None:
        validate_key(key)
        if not store.contains(namespace, key):
            raise Miss(f"{namespace}/{key}: no such key")
    report = store.verify(namespace, key, repair=repair)
    data = {"ok": report.ok, "manifests": report.manifests, "chunks": report.chunks, "bytes": report.bytes, "bad": report.bad,
            "repaired": report.repaired, "removed": report.removed, "unresolved": report.unresolved}

    def render(d: dict[str, Any]) -> str:
        lines = [f"bad: {b}" for b in d["bad"]]
        lines += [f"repaired: {r}" for r in d["repaired"]]
        lines += [f"removed: {r}" for r in d["removed"]]
        verdict = "OK" if d["ok"] else ("REPAIRED" if repair and not d["unresolved"] else "FAILED")
        lines.append(
            f"{verdict}: {d['manifests']} manifests, {d['chunks']} chunks, {human_size(d['bytes'])} checked, "
            f"{len(d['bad'])} problems" + (f", {len(d['repaired'])} repaired, {len(d['removed'])} removed" if repair else "")
        )
        return "\n".join(lines)

    emit(ctx, data, render)
    if report.unresolved or (not report.ok and not repair):
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
    from castore.backends import describe_backend

    cfg = cli_config(ctx)
    rows = [{"name": name, "value": value, "source": source} for name, value, source in cfg.describe()]
    if cfg.signing_key:  # its path and its key's name; never the secret
        from castore.signing import secret_key_name

        row = next(r for r in rows if r["name"] == "signing_key")
        row["key_name"] = secret_key_name(cfg.signing_key)
    store = describe_backend(cfg.url)  # endpoint, region, addressing, credential source: never a secret
    if json_mode(ctx):
        out: dict[str, Any] = {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in rows}
        if store is not None:
            out["store"] = store
        emit(ctx, out)
        return
    width = max(len(r["name"]) for r in rows)

    def render(rs: list[dict[str, Any]]) -> str:
        lines = [f"{r['name']:<{width}}  {_config_value(r)!s:<40}  ({r['source']})" for r in rs]
        if store is not None:
            inner = max(width - 2, *(len(name) for name in store))
            lines += ["", "store:"] + [f"  {name:<{inner}}  {value}" for name, value in store.items()]
        return "\n".join(lines)

    emit(ctx, rows, render)


def _config_value(row: dict[str, Any]) -> str:
    return f"{row['value']} (key {row['key_name']!r})" if "key_name" in row else str(row["value"])



COMMANDS = [put, get, ls, stat_cmd, rm, verify, du, config_cmd]
