"""The ``castore`` command line: the click group, with the commands of each module registered on it.

Each command module (store_cmds, torch_cmds, bench_cmd, key_cmds, ops_cmds, fleet_cmds) defines plain click commands on top of ``common`` and
imports nothing of the others; this module only builds the group and adds them. Errors derived from
:class:`castore.errors.CastoreError` raised in any command become one stderr line and the documented exit code
(:class:`castore.cli.common.CastoreGroup`).
"""

from __future__ import annotations

import click

from castore.cli import bench_cmd, fleet_cmds, key_cmds, ops_cmds, store_cmds, torch_cmds
from castore.cli.common import EPILOG, CastoreGroup, _setup_logging, _state


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


for _module in (store_cmds, torch_cmds, bench_cmd, key_cmds, ops_cmds, fleet_cmds):
    for _command in _module.COMMANDS:
        main.add_command(_command)

__all__ = ["main"]

if __name__ == "__main__":  # pragma: no cover
    main(prog_name="castore")
