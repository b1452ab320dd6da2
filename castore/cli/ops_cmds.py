"""Commands for operating a shared bucket: gc (garbage collection) and doctor (why this machine misses)."""

from __future__ import annotations

from typing import Any

import click

from castore.cli.common import emit, human_size, json_option, open_cli_store


@click.command("gc")
@click.option("--keep-days", type=click.FloatRange(min=0), default=None, metavar="N",
              help="Also remove entries not modified for N days (entries a bundle names stay).")
@click.option("--grace", "grace_hours", type=click.FloatRange(min=0), default=48.0, show_default=True, metavar="H",
              help="Remove an unreferenced chunk object only when it is older than H hours (more than 12.1: twice the refresh age plus clock skew).")
@click.option("--dry-run", is_flag=True, help="Change nothing; show what would go and the bytes freed.")
@click.option("--ignore-unreadable", is_flag=True, help="Sweep even when some manifests cannot be read (their chunks go).")
@click.option("-l", "--long", "long_", is_flag=True, help="List every entry and chunk object that goes.")
@json_option
@click.pass_context
def gc_cmd(ctx: click.Context, keep_days: float | None, grace_hours: float, dry_run: bool, ignore_unreadable: bool,
           long_: bool, as_json: bool) -> None:
    """Remove chunk objects no entry references (and, with --keep-days, old entries).

    Safe while other machines write: a writer that reuses an old chunk uploads it again first, and gc checks
    each chunk's age once more right before deleting it (docs/FORMAT.md, 'Deleting and garbage').
    """
    from castore.gc import collect

    store = open_cli_store(ctx)
    report = collect(
        store, grace=grace_hours * 3600.0, keep_age=None if keep_days is None else keep_days * 86400.0, dry_run=dry_run,
        ignore_unreadable=ignore_unreadable,
    )
    data = report.to_dict()

    def render(d: dict[str, Any]) -> str:
        verb = "would remove" if d["dry_run"] else "removed"
        lines = []
        if long_:
            lines += [f"{verb} entry {e}" for e in d["manifests_expired"]]
            lines += [f"{verb} chunk {c}" for c in d["chunks_removed"]]
        lines += [f"unreadable entry: {u}" for u in d["unreadable_manifests"]]
        lines.append(
            f"{verb} {len(d['manifests_expired'])} of {d['manifests']} entries and {len(d['chunks_removed'])} of "
            f"{d['chunk_objects']} chunk objects: {human_size(d['bytes_freed'])} ({d['bytes_freed']} bytes) freed"
        )
        lines.append(
            f"kept: {d['referenced_chunks']} referenced chunk objects, {d['young_garbage_chunks']} unreferenced ones "
            f"younger than {grace_hours:g} h" + (f", {d['chunks_kept_on_recheck']} refreshed meanwhile" if d["chunks_kept_on_recheck"] else "")
        )
        if d["stopped_early"]:
            lines.append(f"note: {d['stopped_early']}")
        for c in d["lost_chunks"]:
            lines.append(f"error: chunk {c} was deleted late and a new entry names it: put that entry again")
        return "\n".join(lines)

    emit(ctx, data, render)
    if report.lost_chunks:
        ctx.exit(3)


@click.command("doctor")
@click.option("--bundle", metavar="NAME", help="Compare with the environment a bundle was built in.")
@click.option("--namespace", "namespaces", multiple=True, metavar="NS",
              help="Compare with the entries of NS (repeatable; default: every torch-* namespace).")
@click.option("--limit", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Read at most this many entries per namespace (the most recent).")
@json_option
@click.pass_context
def doctor(ctx: click.Context, bundle: str | None, namespaces: tuple[str, ...], limit: int, as_json: bool) -> None:
    """Explain why this machine misses: its environment against the one the entries (or a bundle) were written in.

    Names every field that differs (torch, Triton, CUDA, GPU, CPU vector ISA, Python, compile flags) with the
    fix, and how many entries this machine would hit if they matched. Imports torch.
    """
    from castore.format.keys import validate_namespace

    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise click.UsageError("castore doctor compares this machine's PyTorch with the bucket's: install torch first")
    from castore.torch.doctor import diagnose  # imports torch: only this command pays for it

    for ns in namespaces:
        validate_namespace(ns)
    store = open_cli_store(ctx)
    report = diagnose(store, namespaces=list(namespaces) or None, bundle=bundle, limit=limit)

    def render(d: dict[str, Any]) -> str:
        here = d["here"]
        gpu = f"{here.get('gpu_name')} (capability {here.get('gpu_capability')}, cuda:{here.get('gpu_index')})" if here.get("gpu_name") else "none"
        head = [
            (f"this machine: torch {here.get('torch')}, Triton {here.get('triton') or 'none'}, "
             f"CUDA {here.get('cuda') or 'none'}, GPU {gpu}, CPU {here.get('cpu_arch')} {here.get('cpu_isa')}, "
             f"Python {here.get('python')}"),
            f"looks in:     {d['url']} namespace {d['namespace']}",
            "",
        ]
        return "\n".join(head + d["advice"])

    emit(ctx, report.to_dict(), render)


COMMANDS = [gc_cmd, doctor]
