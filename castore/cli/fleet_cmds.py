"""`castore prewarm` and `castore pull`: a workload's compiled artifacts as a bundle, built in CI, baked into images.

    castore prewarm --name train -- python train.py       # run it under castore, publish bundle 'train'
    castore pull train --into /opt/castore                 # its closure in a directory, and env.sh
    . /opt/castore/env.sh && python train.py               # warm, no network

Neither imports torch in the castore process: the workload and the environment fingerprint run in children.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import click

from castore.cli.common import (
    VerificationFailed,
    cli_config,
    emit,
    human_size,
    json_option,
    open_cli_store,
    progress_bar,
)

FINGERPRINT_CODE = (
    "import json; from castore.torch.fingerprint import machine_fingerprint; print(json.dumps(machine_fingerprint()))"
)
# The castore settings env.sh exports; the rest (timeouts, the cache directory, any signing key) stay the machine's.
ENV_SH_CASTORE = ("CASTORE_URL", "CASTORE_READ_ONLY", "CASTORE_NAMESPACE", "CASTORE_TORCH_AUTOINSTALL",
                  "CASTORE_TRUSTED_KEYS", "CASTORE_REQUIRE_SIGNATURES")  # fmt: skip


class PublishFailed(VerificationFailed):
    """Entries the workload used did not reach the store (exit code 3)."""


def _fingerprint_python(command: tuple[str, ...], env: dict[str, str], explicit: str | None) -> str:
    """The interpreter the workload ran: the command's own when it is a Python, else this one."""
    if explicit:
        return explicit
    if os.path.basename(command[0]).startswith("python"):
        found = shutil.which(command[0], path=env.get("PATH"))
        if found:
            return found
    return sys.executable


def machine_fingerprint(python: str, env: dict[str, str]) -> dict[str, str]:
    """The environment fingerprint, computed by a child that imports torch (this process never does)."""
    child_env = dict(env)
    child_env["CASTORE_TORCH_AUTOINSTALL"] = "0"  # no castore session in the child
    child_env.pop("CASTORE_RECORD_DIR", None)
    proc = subprocess.run([python, "-c", FINGERPRINT_CODE], env=child_env, capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise click.ClickException(
            f"could not compute the environment fingerprint with {python}:\n{proc.stderr[-2000:]}"
        )
    return {str(k): str(v) for k, v in json.loads(lines[-1]).items()}


@click.command("prewarm", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--name", required=True, help="Bundle name; each successful prewarm publishes its next version.")
@click.option("--python", "python_exe", metavar="PATH",
              help="Interpreter for the environment fingerprint (default: the command's).")
@click.option("--settle", default=10.0, show_default=True,
              help="Seconds to wait for uploads still landing after the command exits.")  # fmt: skip
@json_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def prewarm(ctx: click.Context, name: str, python_exe: str | None, settle: float, as_json: bool,
            command: tuple[str, ...]) -> None:  # fmt: skip
    """Run COMMAND under castore and publish bundle NAME: every entry its processes read or wrote, packed.

    Exits with COMMAND's status if it fails, and with 3 (naming them) if entries it used did not reach the store.
    """
    from castore import bundles
    from castore.format.pack import bundle_key
    from castore.torch import job_environment
    from castore.torch.recording import RECORD_DIR_ENV, read_records

    bundle_key(name, 1)  # a bad name fails before the workload runs
    config = cli_config(ctx)
    if config.read_only:
        raise click.UsageError("prewarm writes to the store: it cannot run with read_only set")
    say = (lambda *_: None) if as_json else (lambda msg: click.echo(msg, err=True))
    record_dir = tempfile.mkdtemp(prefix="castore-prewarm-")
    try:
        env = job_environment(config)
        env[RECORD_DIR_ENV] = record_dir
        executable = shutil.which(command[0], path=env.get("PATH"))
        if executable is None:
            raise click.UsageError(f"command not found: {command[0]}")
        say(f"castore: prewarm {name}: running {shlex.join(command)} against {config.url}")
        started = time.monotonic()
        rc = subprocess.run([executable, *command[1:]], env=env).returncode
        if rc != 0:
            click.echo(f"castore: error: the command exited with status {rc}; no bundle published", err=True)
            ctx.exit(rc)
        entries = read_records(record_dir)
    finally:
        shutil.rmtree(record_dir, ignore_errors=True)
    if not entries:
        raise PublishFailed("the command used no castore entry (did it compile anything under torch.compile?)")
    store = open_cli_store(ctx)
    # Every process flushed its uploads at exit; a compile worker may still be finishing: wait a little for it.
    deadline = time.monotonic() + settle
    missing = bundles.missing_entries(store, entries)
    while missing and time.monotonic() < deadline:
        time.sleep(0.5)
        missing = bundles.missing_entries(store, missing)
    if missing:
        shown = "\n  ".join(f"{ns}/{key}" for ns, key in missing[:50])
        raise PublishFailed(
            f"{len(missing)} of {len(entries)} entries the command used are not in the store:\n  {shown}"
        )
    fingerprint = machine_fingerprint(_fingerprint_python(command, env, python_exe), env)
    result = bundles.publish(store, name, entries, fingerprint, meta={"command": shlex.join(command)[:1000]})
    b = result.bundle
    data = {
        "bundle": f"{b.name}@{b.version}",
        "published": result.published,
        "entries": len(b.entries),
        "packs": len(b.index.packs),
        "packs_written": result.packs_written,
        "bytes_packed": result.bytes_packed,
        "objects_reused": result.objects_reused,
        "objects": len(b.index.manifests) + len(b.index.chunks),
        "aot_functions": _aot_functions(b.entries),
        "seconds": round(time.monotonic() - started, 2),
        "fingerprint": b.fingerprint,
    }
    emit(ctx, data, _render_prewarm)


def _aot_functions(entries: list[tuple[str, str]]) -> int:
    """How many of a bundle's entries are ahead-of-time compiled functions (castore.torch.aot_compile)."""
    from castore.torch.aot_key import KEY_PREFIX

    return sum(1 for _, key in entries if key.startswith(KEY_PREFIX))


def _render_prewarm(d: dict[str, Any]) -> str:
    if not d["published"]:
        return f"bundle {d['bundle']} is up to date ({d['entries']} entries, same environment): nothing published"
    aot = f" ({d['aot_functions']} ahead-of-time compiled functions)" if d["aot_functions"] else ""
    return (
        f"published bundle {d['bundle']}: {d['entries']} entries{aot}, {d['objects']} objects in {d['packs']} pack(s); "
        f"packed {human_size(d['bytes_packed'])} in {d['packs_written']} new pack(s), "
        f"reused {d['objects_reused']} objects"
    )


def env_sh(config: Any, directory: str, namespace: str | None) -> str:
    """A POSIX shell script exporting what makes a process read the pulled store, and only it (the pulling
    configuration's trust settings included)."""
    import dataclasses

    from castore.torch import job_environment

    pulled = dataclasses.replace(config, url="file://" + os.path.join(directory, "store"), read_only=True)
    env = job_environment(pulled, namespace, base={})
    lines = ["# Written by `castore pull`: source it, then run the job; it reads the pulled store, not the network."]
    for name, value in sorted(env.items()):
        if name.startswith("CASTORE_") and name not in ENV_SH_CASTORE or (name in ENV_SH_CASTORE and not value):
            continue
        if name == "PYTHONPATH":
            lines.append(f'export PYTHONPATH={shlex.quote(value)}"${{PYTHONPATH:+:$PYTHONPATH}}"')
        else:
            lines.append(f"export {name}={shlex.quote(value)}")
    return "\n".join(lines) + "\n"


@click.command("pull")
@click.argument("bundle", metavar="NAME[@VERSION]")
@click.option("--into", "into", required=True, type=click.Path(file_okay=False), help="Directory to fill (created).")
@json_option
@click.pass_context
def pull(ctx: click.Context, bundle: str, into: str, as_json: bool) -> None:
    """Copy bundle NAME (its newest version, or @VERSION) into a directory, verified, and write DIR/env.sh.

    Afterwards `. DIR/env.sh && python train.py` reads every artifact from DIR: no network, nothing compiled.
    """
    from castore import bundles
    from castore.backends.file import FileBackend
    from castore.fsutil import write_atomic

    directory = os.path.abspath(into)
    store = open_cli_store(ctx)
    dest = FileBackend(os.path.join(directory, "store"))
    started = time.monotonic()
    opened = bundles.open_bundle(store, bundle)
    with progress_bar(ctx, opened.stored_bytes, f"pull {opened.name}@{opened.version}") as update:
        report = bundles.pull(store, opened, dest, progress=update)
    if report.bad:
        shown = "\n  ".join(report.bad[:50])
        raise VerificationFailed(
            f"{len(report.bad)} objects of bundle {opened.name}@{opened.version} could not be read intact:\n  {shown}"
        )
    namespaces = sorted({ns for ns, _ in opened.entries})
    namespace = namespaces[0] if len(namespaces) == 1 else None
    write_atomic(os.path.join(directory, "env.sh"), env_sh(cli_config(ctx), directory, namespace).encode())
    info = {
        "bundle": f"{opened.name}@{opened.version}",
        "entries": len(opened.entries),
        "aot_functions": _aot_functions(opened.entries),
        "namespaces": namespaces,
        "fingerprint": opened.fingerprint,
        "created": opened.manifest.created,
        "source": store.url,
    }
    write_atomic(os.path.join(directory, "bundle.json"), (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
    data = {
        **info,
        "directory": directory,
        "objects": report.objects,
        "already_held": report.skipped,
        "bytes": report.bytes,
        "ranged_reads": report.ranged_reads,
        "fallback_reads": report.fallback_reads,
        "seconds": round(time.monotonic() - started, 2),
    }
    # A pull is usually a step of an image build: the moment to say the image would compile torch's sources again.
    from castore.torch import bytecode  # reads file names only; torch is not imported

    data["bytecode_advice"] = bytecode.advice(bytecode.compiler_bytecode())
    for line in data["bytecode_advice"]:
        click.echo(f"castore: {line}", err=True)
    emit(ctx, data, _render_pull)


def _render_pull(d: dict[str, Any]) -> str:
    return (
        f"pulled bundle {d['bundle']} into {d['directory']}: {d['entries']} entries"
        + (f" ({d['aot_functions']} ahead-of-time compiled functions)" if d["aot_functions"] else "")
        + f", {d['objects']} objects "
        f"({human_size(d['bytes'])}) in {d['ranged_reads']} ranged read(s), {d['already_held']} held already\n"
        f"use it with: . {shlex.quote(os.path.join(d['directory'], 'env.sh'))}"
    )


COMMANDS = [prewarm, pull]
