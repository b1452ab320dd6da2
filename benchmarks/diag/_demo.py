"""What the diagnostic scripts share: their model arguments, the demo process they run, and how they run it.

The scripts run as ``python benchmarks/diag/<script>.py``, so this folder is on their sys.path.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Any

from castore.bench.machines import last_json


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
    return [sys.executable, "-m", "castore.bench.demo_model", "--model", args.model, "--mode", args.mode, "--device", args.device, *flags]


def run_demo(name: str, argv: list[str], env: dict[str, str], timeout: float = 900) -> tuple[dict[str, Any] | None, str]:
    """(demo_model's result line, stderr) of one process; a failure is printed and gives no result."""
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    result = last_json(done.stdout) if done.returncode == 0 else None
    if result is None:
        print(name, "FAILED", done.returncode, done.stderr[-2000:], flush=True)
    return result, done.stderr


def print_phases(name: str, result: dict[str, Any]) -> None:
    gc = result.get("gc") or {}
    cpu = result.get("cpu_seconds") or {}
    print(name, result["seconds_to_first_output"], result["seconds_import"], result["seconds_compile"],
          f"gc {gc.get('seconds')} (compile {gc.get('seconds_compile')}, {gc.get('tracked_objects')} objects)",
          f"cpu {cpu.get('self')} (main thread {cpu.get('main_thread')}, compile workers {cpu.get('descendants')})", flush=True)
