"""What the diagnostic scripts share: their model arguments and the demo process they run.

The scripts run as ``python benchmarks/diag/<script>.py``, so this folder is on their sys.path.
"""

from __future__ import annotations

import argparse
import sys


def parse_model_args(model: str, mode: str, **extra: tuple[type, object]) -> argparse.Namespace:
    """--model, --mode and --device (cpu), plus extra options given as name=(type, default)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=model)
    parser.add_argument("--mode", default=mode)
    parser.add_argument("--device", default="cpu")
    for name, (kind, default) in extra.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=default)
    return parser.parse_args()


def demo_argv(args: argparse.Namespace, *flags: str) -> list[str]:
    """The command of one demo_model process of the chosen model."""
    return [sys.executable, "-m", "castore.torch.demo_model", "--model", args.model, "--mode", args.mode, "--device", args.device, *flags]
