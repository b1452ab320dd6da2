"""`castore run`, `castore stats` and `castore demo`: the commands about torch.compile.

None of them imports torch in the castore process itself; torch runs in the processes they start.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import click

from castore.cli.common import EXIT_USAGE, _state, cli_config, emit, json_option
from castore.torch import job_environment


@click.command("run", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def run(ctx: click.Context, command: tuple[str, ...]) -> None:
    """Run COMMAND with torch.compile served from castore, no code changes: castore run -- python train.py

    With -v, castore logs in every process of the job (CASTORE_LOG=debug)."""
    env = job_environment(cli_config(ctx))
    if _state(ctx).get("verbose"):
        env["CASTORE_LOG"] = "debug"
    executable = shutil.which(command[0], path=env.get("PATH"))
    if executable is None:
        raise click.UsageError(f"command not found: {command[0]}")
    os.execvpe(executable, list(command), env)


def _stats_records(cache_dir: str) -> list[dict[str, Any]]:
    records = []
    for path in sorted(glob.glob(os.path.join(cache_dir, "stats", "*.json"))):
        try:
            with open(path) as f:
                records.append(json.load(f))
        except (OSError, ValueError):
            continue
    return records


def aggregate_stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    caches: dict[str, dict[str, float]] = {}
    layers = {"local": {"hits": 0}, "bucket": {"fetches": 0}}
    untrusted = 0
    for record in records:
        untrusted += int(record.get("untrusted", 0))
        for name, counters in record.get("caches", {}).items():
            total = caches.setdefault(name, {})
            for k, v in counters.items():
                total[k] = total.get(k, 0) + v
        for layer, counters in record.get("layers", {}).items():
            for k, v in counters.items():
                layers.setdefault(layer, {})[k] = layers.get(layer, {}).get(k, 0) + v
    return {"processes": len(records), "caches": caches, "layers": layers, "untrusted": untrusted}


def _render_stats(data: dict[str, Any]) -> str:
    lines = [f"{data['processes']} process(es) recorded"]
    header = f"{'cache':<18}{'hits':>7}{'misses':>8}{'puts':>6}{'errors':>8}{'read':>11}{'written':>11}{'saved s':>9}{'waited s':>10}"
    lines.append(header)
    for name, c in sorted(data["caches"].items()):
        errors = int(c.get("get_errors", 0) + c.get("put_errors", 0))
        lines.append(
            f"{name:<18}{int(c.get('hits', 0)):>7}{int(c.get('misses', 0)):>8}{int(c.get('puts', 0)):>6}{errors:>8}"
            f"{_mb(c.get('bytes_read', 0)):>11}{_mb(c.get('bytes_written', 0)):>11}"
            f"{c.get('seconds_saved', 0):>9.1f}{c.get('seconds_waited', 0):>10.2f}"
        )
    lines.append(f"local layer hits: {data['layers']['local'].get('hits', 0)}; bucket fetches: {data['layers']['bucket'].get('fetches', 0)}")
    lines.append(f"untrusted entries refused (unsigned, wrongly signed, revoked or moved; counted as misses): {data.get('untrusted', 0)}")
    return "\n".join(lines)


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


@click.command("stats")
@click.option("--reset", is_flag=True, help="Forget the recorded counters.")
@json_option
@click.pass_context
def stats(ctx: click.Context, reset: bool, as_json: bool) -> None:
    """Hits, misses, puts, bytes and seconds saved per cache and per layer, over the processes of this node."""
    config = cli_config(ctx)
    records = _stats_records(config.cache_dir)
    if reset:
        for path in glob.glob(os.path.join(config.cache_dir, "stats", "*.json")):
            os.unlink(path)
    emit(ctx, aggregate_stats(records), _render_stats)


TORCH_MISSING = "castore demo needs torch in this Python ({python}): pip install torch (or `make install` in a clone)"


def torch_importable() -> bool:
    """Whether the demo's processes (this interpreter) can import torch; looked up, not imported."""
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


class DemoProcessFailed(Exception):
    def __init__(self, message: str, torch_missing: bool) -> None:
        super().__init__(message)
        self.torch_missing = torch_missing


def _run_demo_process(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "castore.bench.demo_model", *args], env=env, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        missing = "No module named 'torch'" in proc.stderr
        raise DemoProcessFailed(f"demo process failed ({proc.returncode}):\n{proc.stderr[-4000:]}", missing)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = round(wall, 3)
    return result


def fresh_machine_env(base: dict[str, str], root: str) -> dict[str, str]:
    """Empty PyTorch cache dirs (Inductor, Triton, precompiled headers under TMPDIR) and an empty local layer."""
    env = dict(base)
    for name, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton"), ("TMPDIR", "tmp"), ("CASTORE_CACHE_DIR", "castore-local")):
        path = os.path.join(root, sub)
        os.makedirs(path, exist_ok=True)
        env[name] = path
    return env


def demo_overrides(global_overrides: dict[str, Any], url: str | None, work: str) -> dict[str, Any]:
    """The configuration overrides of a demo run: the store named by --url (the demo's or the global one), else
    an embedded file:// store under work, whatever CASTORE_URL or a config file names (the fleet's store is
    not a scratch space); that temporary store is writable whatever read_only says."""
    overrides = dict(global_overrides)
    explicit = url or overrides.get("url")
    if explicit:
        overrides["url"] = explicit
    else:
        overrides["url"] = "file://" + os.path.join(work, "store")
        overrides["read_only"] = False
    return overrides


@click.command("demo")
@click.option("--model", default="transformer", type=click.Choice(["transformer", "cnn", "mlp"]), show_default=True)
@click.option("--mode", default="train", type=click.Choice(["train", "infer"]), show_default=True)
@click.option("--url", metavar="URL", help="Use this store (default: a temporary file:// store, removed afterwards).")
@json_option
@click.pass_context
def demo(ctx: click.Context, model: str, mode: str, url: str | None, as_json: bool) -> None:
    """Compile a small model cold, then as a fresh machine served from the store; print both times.

    The demo writes into a store only when given --url (here or before the command): otherwise it uses a
    temporary file:// store, whatever store is configured. Its temporary files are removed in every case.
    """
    from castore.config import load_config

    if not torch_importable():
        click.echo(f"castore: error: {TORCH_MISSING.format(python=sys.executable)}", err=True)
        ctx.exit(EXIT_USAGE)
    root = ctx.find_root().obj or {}
    work = tempfile.mkdtemp(prefix="castore-demo-")
    try:
        config = load_config(demo_overrides(root.get("overrides") or {}, url, work))
        namespace = f"demo-{int(time.time())}-{os.getpid()}"  # cold means cold, even on a shared store
        data = _run_demo(config, namespace, model, mode, work, say=(lambda *_: None) if as_json else (lambda msg: click.echo(msg, err=True)))
    except DemoProcessFailed as exc:
        if exc.torch_missing:
            click.echo(f"castore: error: {TORCH_MISSING.format(python=sys.executable)}", err=True)
            ctx.exit(EXIT_USAGE)
        raise click.ClickException(str(exc)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(ctx, data, _render_demo)


def _run_demo(config: Any, namespace: str, model: str, mode: str, work: str, say: Callable[[str], None]) -> dict[str, Any]:
    base = job_environment(config, namespace)
    args = ["--model", model, "--mode", mode]
    say(f"store: {config.url}  (namespace {namespace})")
    say("1/3 cold compile (empty caches, empty store) ...")
    cold = _run_demo_process(args + ["--castore"], fresh_machine_env(base, os.path.join(work, "machine-a")))
    say("2/3 fresh machine (empty local dirs, store populated) ...")
    fresh = _run_demo_process(args + ["--castore"], fresh_machine_env(base, os.path.join(work, "machine-b")))
    say("3/3 PyTorch's own warm local cache (machine A again, castore off), for reference ...")
    plain = fresh_machine_env(base, os.path.join(work, "machine-a"))
    for name in ("CASTORE_TORCH_AUTOINSTALL", "TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE", "TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE", "TORCHINDUCTOR_AUTOTUNE_REMOTE_CACHE"):
        plain.pop(name, None)
    warm = _run_demo_process(args, plain)
    if fresh["output_digest"] != cold["output_digest"]:
        raise click.ClickException("the fresh machine computed different outputs than the cold compile")
    return {
        "model": model,
        "mode": mode,
        "store": config.url,
        "cold_seconds": cold["seconds_to_first_output"],
        "fresh_machine_seconds": fresh["seconds_to_first_output"],
        "warm_local_seconds": warm["seconds_to_first_output"],
        "speedup_vs_cold": round(cold["seconds_to_first_output"] / fresh["seconds_to_first_output"], 2),
        "fresh_over_warm_local": round(fresh["seconds_to_first_output"] / warm["seconds_to_first_output"], 2),
        "fresh_machine_compiler_runs": fresh.get("compiler_runs"),
        "cold": cold,
        "fresh_machine": fresh,
        "warm_local": warm,
    }


def _render_demo(d: dict[str, Any]) -> str:
    fresh = d["fresh_machine"]
    caches = fresh.get("castore", {}).get("caches", {})
    hits = ", ".join(f"{name} {int(c['hits'])}" for name, c in sorted(caches.items()) if c.get("hits"))
    return "\n".join(
        [
            f"model: {d['model']} ({d['mode']}), store: {d['store']}",
            f"  cold compile               {d['cold_seconds']:7.2f} s",
            f"  fresh machine via castore  {d['fresh_machine_seconds']:7.2f} s   ({d['speedup_vs_cold']}x faster than cold)",
            f"  PyTorch warm local cache   {d['warm_local_seconds']:7.2f} s   (fresh machine / warm local = {d['fresh_over_warm_local']})",
            f"  fresh machine: C++ compiler runs {d['fresh_machine_compiler_runs']}; "
            f"fx graph hits {fresh['fxgraph'].get('fxgraph_cache_hit', 0)}, aot autograd hits {fresh['aot_autograd'].get('autograd_cache_hit', 0)}",
            f"  castore hits by cache: {hits or 'none'}",
        ]
    )


COMMANDS = [run, stats, demo]
