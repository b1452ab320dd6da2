"""Benchmarks of castore (package code, so `castore bench` and the scripts in benchmarks/ share it).

- :mod:`castore.bench.hot_load`: time to the first compiled output on a fresh machine (issue 4).
"""
