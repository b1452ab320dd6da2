"""Loaded by every Python process started under castore (PYTHONPATH names this folder).

When CASTORE_TORCH_AUTOINSTALL=1, installs castore's torch hooks right after ``import torch`` finishes,
so compile workers and ``castore run`` children use the store without code changes. Then hands over to
any other sitecustomize on the path.
"""

import os
import sys


def _chain_next_sitecustomize() -> None:
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None and os.path.dirname(os.path.abspath(spec.origin or "")) != here:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if os.environ.get("CASTORE_TORCH_AUTOINSTALL") == "1":
    try:
        from castore_autoload_hook import install_after_torch_import  # this folder; imports no castore module

        install_after_torch_import()
    except Exception as exc:  # noqa: BLE001 - never break interpreter start-up
        sys.stderr.write(f"castore: autoload failed: {exc}\n")

_chain_next_sitecustomize()
