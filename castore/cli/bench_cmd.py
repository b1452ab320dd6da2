"""`castore bench`: the hot-load benchmark. Options are those of castore.bench.hot_load.

The castore process itself never imports torch; the benchmark runs torch in the processes it starts.
"""

from __future__ import annotations

import click


@click.command(
    "bench",
    add_help_option=False,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "allow_interspersed_args": False},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Time to the first compiled output per cache strategy (cold, warm-local, castore, Redis, MegaCache).

    Starts SeaweedFS and redis-server on 127.0.0.1; writes to ./castore-bench/<machine> unless --out says
    otherwise; see `castore bench --help`.
    """
    from castore.bench.hot_load import main as run_bench

    raise SystemExit(run_bench(list(args)))


COMMANDS = [bench]
