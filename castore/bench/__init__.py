"""Benchmarks of castore (package code, so `castore bench`, `castore demo` and the scripts in benchmarks/ share it).

- :mod:`castore.bench.hot_load`: time to the first compiled output on a fresh machine, per cache strategy; its
  parts are :mod:`~castore.bench.modes` (what is measured), :mod:`~castore.bench.machines` (environments, servers,
  process runs) and :mod:`~castore.bench.report` (summaries, tables, charts, pooled results).
- :mod:`castore.bench.demo_model`: the measured process, one timed torch.compile run; it builds
  :mod:`~castore.bench.models` and reads :mod:`~castore.bench.counters`.
"""
