#!/usr/bin/env python
"""Hot-load benchmark (issue 4): a thin wrapper over castore.bench.hot_load (same as `castore bench`).

    .venv/bin/python benchmarks/hot_load.py --help
"""

import sys

from castore.bench.hot_load import main

if __name__ == "__main__":
    sys.exit(main())
