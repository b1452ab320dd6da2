"""One timed torch.compile run, as a separate process would see it. Used by `castore demo` and the benchmarks.

    python -m castore.bench.demo_model --model transformer --mode train [--castore]
    python -m castore.bench.demo_model --model gpt2 --mode infer --device cuda --save-megacache bundle.bin
    python -m castore.bench.demo_model --model my_model.py:make_model --mode train     # your own model

A model of your own is named ``FILE.py:FUNCTION`` or ``MODULE:FUNCTION``: FUNCTION() (or FUNCTION(device=...)
where it takes a ``device``) returns ``(module, example)``, example being the input tensor or a tuple of the
module's positional inputs. The module and the example's tensors are moved to --device; dtypes are left as given.
A training step is a backward pass of the mean square of the first output tensor.

Prints one JSON line: seconds from interpreter start to the first compiled output, the compile part alone,
PyTorch's cache counters, castore's counters and how many times a C++ compiler ran. On CUDA it also counts
Triton kernel compiles (ptxas runs, compile workers included) and autotuning calls (in this process).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import stat
import sys
import tempfile
import threading
import time
from typing import Any

_T_START = time.time()

CPU_MODELS = ["transformer", "cnn", "mlp"]
GPU_MODELS = ["gpt2", "gpt2-autotune", "resnet50"]
MODELS = CPU_MODELS + GPU_MODELS
PTXAS_COUNT_ENV = "CASTORE_PTXAS_COUNT_FILE"


class ModelSpecError(ValueError):
    """A --model that names neither a built-in model nor a loadable FILE.py:FUNCTION / MODULE:FUNCTION."""


def is_factory(model: str) -> bool:
    """A model of your own (FILE.py:FUNCTION or MODULE:FUNCTION), not a built-in one."""
    return ":" in model


def factory_file(model: str) -> str | None:
    """The file a FILE.py:FUNCTION model names, as given; None for a built-in or MODULE:FUNCTION model."""
    target, sep, _ = model.rpartition(":")
    return target if sep and (target.endswith(".py") or os.sep in target) else None


def load_factory(spec: str) -> Any:
    """The function a FILE.py:FUNCTION or MODULE:FUNCTION spec names (a file's folder goes on sys.path first, so
    that the file can import its neighbours)."""
    import importlib
    import importlib.util

    target, _, name = spec.rpartition(":")
    if not target or not name.isidentifier():
        raise ModelSpecError(f"--model {spec!r}: expected FILE.py:FUNCTION or MODULE:FUNCTION")
    if factory_file(spec) is not None:
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise ModelSpecError(f"--model {spec!r}: no file {path}")
        sys.path.insert(0, os.path.dirname(path))
        module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
        if module_spec is None or module_spec.loader is None:
            raise ModelSpecError(f"--model {spec!r}: {path} is not a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ModelSpecError(f"--model {spec!r}: cannot import {target}: {exc}") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ModelSpecError(f"--model {spec!r}: {target} has no function {name}")
    return fn


def _build_from_factory(spec: str, device: str):  # noqa: ANN202
    import inspect

    import torch

    fn = load_factory(spec)
    try:
        takes_device = "device" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes_device = False
    made = fn(device=device) if takes_device else fn()
    if not (isinstance(made, (tuple, list)) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
        raise ModelSpecError(f"--model {spec!r}: the function must return (torch.nn.Module, example inputs)")
    net, example = made
    inputs = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    return net.to(device), tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)


def build(model: str, mode: str, device: str, *, layers: int | None = None, batch: int | None = None):  # noqa: ANN201
    """(module, example input) for a model name; GPU models run in bf16 on CUDA. For a FILE.py:FUNCTION or
    MODULE:FUNCTION model, the example is the tuple of the module's positional inputs."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    dtype = None
    if is_factory(model):
        net, example = _build_from_factory(model, device)
        net.train(mode == "train")  # eval() for inference
        return net, example
    if model == "transformer":
        # Without this, eval + no_grad takes nn.TransformerEncoderLayer's fused fast path: one opaque op, nothing
        # for Inductor to generate, so "inference" would compile no kernel at all.
        if hasattr(torch.backends, "mha"):
            torch.backends.mha.set_fastpath_enabled(False)
        layer = nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=256, batch_first=True, dropout=0.0)
        net = nn.TransformerEncoder(layer, num_layers=layers or 2, enable_nested_tensor=False)
        example = torch.randn(batch or 4, 32, 128)
    elif model == "cnn":
        net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )
        example = torch.randn(batch or 8, 3, 32, 32)
    elif model == "mlp":
        net = nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.LayerNorm(256)) for _ in range(layers or 3)])
        example = torch.randn(batch or 32, 256)
    elif model in ("gpt2", "gpt2-autotune"):
        from transformers import GPT2Config, GPT2LMHeadModel  # random init: no download

        config = GPT2Config(n_layer=layers or 12)
        config.use_cache = False
        net = GPT2LMHeadModel(config)
        example = torch.randint(0, config.vocab_size, (batch or 4, 256))
        dtype = torch.bfloat16 if device != "cpu" else None
    elif model == "resnet50":
        import torchvision

        net = torchvision.models.resnet50(weights=None)
        example = torch.randn(batch or 16, 3, 224, 224)
        dtype = torch.bfloat16 if device != "cpu" else None
    else:
        raise SystemExit(f"unknown model {model!r}")
    net = net.to(device)
    example = example.to(device)
    if dtype is not None:
        net = net.to(dtype)
        if example.is_floating_point():
            example = example.to(dtype)
    if mode == "train":
        net.train()
    else:
        net.eval()
    return net, example


def _logits(out: Any) -> Any:
    """The tensor an output stands for: a Hugging Face output's logits, else the first tensor in it."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out:
        return _logits(out[0])
    if isinstance(out, dict) and out:
        return _logits(next(iter(out.values())))
    return out


# -- GPU proof: count Triton compiles and autotuning -------------------------------------------------
def _real_ptxas() -> str | None:
    """The ptxas Triton would run: $TRITON_PTXAS_PATH, else the one bundled with Triton."""
    explicit = os.environ.get("TRITON_PTXAS_PATH")
    if explicit and os.access(explicit, os.X_OK):
        return explicit
    try:
        import importlib.util

        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    candidates = [os.path.join(root, "backends", "nvidia", "bin", "ptxas")]
    try:  # Triton >= 3.3 names it in its knobs
        from triton import knobs

        descriptor = type(knobs.nvidia).__dict__.get("ptxas")
        if descriptor is not None and getattr(descriptor, "default_path", None):
            candidates.insert(0, descriptor.default_path)
    except Exception:  # noqa: BLE001 - older Triton
        pass
    import shutil

    candidates.append(shutil.which("ptxas") or "")
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def install_ptxas_counter() -> str | None:
    """Point TRITON_PTXAS_PATH at a wrapper that appends a line per compile to $CASTORE_PTXAS_COUNT_FILE.

    Set in os.environ before Triton reads it, so Inductor's compile workers (subprocesses) inherit it.
    ``ptxas --version`` (Triton's version probe) is not counted. Returns the count file, or None.
    """
    real = _real_ptxas()
    if real is None:
        return None
    work = tempfile.mkdtemp(prefix="castore-ptxas-")
    count_file = os.environ.get(PTXAS_COUNT_ENV) or os.path.join(work, "ptxas.count")
    open(count_file, "a").close()
    wrapper = os.path.join(work, "ptxas")
    with open(wrapper, "w") as f:
        f.write(
            "#!/bin/sh\n"
            'case " $* " in *" --version "*) ;; *) echo "$$" >> "$' + PTXAS_COUNT_ENV + '" ;; esac\n'
            f'exec "{real}" "$@"\n'
        )
    os.chmod(wrapper, os.stat(wrapper).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.environ[PTXAS_COUNT_ENV] = count_file
    os.environ["TRITON_PTXAS_PATH"] = wrapper
    return count_file


class ThreadCpu:
    """CPU seconds of the threads this process started, by name with pool numbers dropped ("castore_3" and
    "castore_0" count as "castore"): the threads that share the interpreter lock with the main thread's tracing.
    A thread that has ended is counted when its run() returns, a live one from /proc (Linux; elsewhere it is left
    out). Counts threads started after install() whose class does not override run()."""

    def __init__(self) -> None:
        self._ended: dict[str, float] = {}
        self._lock = threading.Lock()

    def install(self) -> None:
        run = threading.Thread.run

        def counted_run(thread: threading.Thread) -> None:
            try:
                run(thread)
            finally:
                seconds = time.thread_time()
                with self._lock:
                    name = _thread_group(thread.name)
                    self._ended[name] = self._ended.get(name, 0.0) + seconds
                    # on the object: a later thread may get this one's ident, and it is listed until it exits
                    thread._cpu_counted = True  # type: ignore[attr-defined]

        threading.Thread.run = counted_run  # type: ignore[method-assign]

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            totals = dict(self._ended)
            live = [t for t in threading.enumerate() if not getattr(t, "_cpu_counted", False)]
        for thread in live:
            if thread is threading.main_thread() or thread.native_id is None:
                continue
            seconds = _task_cpu_seconds(thread.native_id)
            if seconds is not None:
                name = _thread_group(thread.name)
                totals[name] = totals.get(name, 0.0) + seconds
        return {name: round(seconds, 3) for name, seconds in sorted(totals.items())}


def _thread_group(name: str) -> str:
    return re.sub(r"[-_]\d+", "", name)


def _task_cpu_seconds(native_id: int) -> float | None:
    try:
        return _proc_stat(f"/proc/self/task/{native_id}/stat")[1]
    except (OSError, ValueError, IndexError):
        return None


def _proc_stat(path: str) -> tuple[str, float]:
    """(parent pid, CPU seconds: utime + stime) from a /proc/<pid>/stat or /proc/self/task/<tid>/stat file."""
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return fields[1], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


THREAD_CPU = ThreadCpu()


def cpu_seconds() -> dict[str, Any]:
    """CPU seconds (user + system) used so far by this process, by the threads it started (``ThreadCpu``) and by
    its live descendants (Inductor's compile workers, which nobody waits for). Beside the wall times they tell
    added work from contention for the cores. Descendants are read from /proc (Linux); elsewhere None."""
    mine = os.times()
    descendants: float | None = None
    try:
        procs: dict[str, tuple[str, float]] = {}  # pid -> (parent pid, cpu seconds)
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                procs[pid] = _proc_stat(f"/proc/{pid}/stat")
            except OSError:
                continue  # exited meanwhile
        tree, descendants, grew = {str(os.getpid())}, 0.0, True
        while grew:  # a pool's workers are grandchildren
            new = {pid for pid, (parent, _) in procs.items() if parent in tree and pid not in tree}
            descendants += sum(procs[pid][1] for pid in new)
            tree |= new
            grew = bool(new)
    except (OSError, ValueError, IndexError):
        descendants = None
    return {
        "self": round(mine.user + mine.system, 3),
        "threads": THREAD_CPU.snapshot(),
        "descendants": None if descendants is None else round(descendants, 3),
    }


def _count_lines(path: str | None) -> int | None:
    if not path:
        return None
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except OSError:
        return None


AUTOTUNE_ENTRY_POINTS = [
    ("torch._inductor.runtime.triton_heuristics", "CachingAutotuner", "benchmark_all_configs"),
    ("torch._inductor.runtime.coordinate_descent_tuner", "CoordescTuner", "autotune"),
    ("torch._inductor.select_algorithm", "AlgorithmSelectorCache", "autotune"),
    ("torch._inductor.select_algorithm", "AlgorithmSelectorCache", "benchmark_in_current_process"),
    ("torch._inductor.select_algorithm", "AlgorithmSelectorCache", "benchmark_in_sub_process"),
]


def install_autotune_counters() -> dict[str, int]:
    """Wrap PyTorch's autotuning entry points (those present in this version) with call counters."""
    import functools
    import importlib
    import inspect

    counts: dict[str, int] = {}
    for module_name, cls_name, attr in AUTOTUNE_ENTRY_POINTS:
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
            raw = inspect.getattr_static(cls, attr)
        except (ImportError, AttributeError):
            continue
        name = f"{cls_name}.{attr}"
        counts[name] = 0
        kind = classmethod if isinstance(raw, classmethod) else staticmethod if isinstance(raw, staticmethod) else None
        fn = raw.__func__ if kind else raw

        def make(fn: Any, name: str) -> Any:
            @functools.wraps(fn)
            def counted(*a: Any, **kw: Any) -> Any:
                counts[name] += 1
                return fn(*a, **kw)

            return counted

        wrapped = make(fn, name)
        setattr(cls, attr, kind(wrapped) if kind else wrapped)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--model", default="transformer", help=f"one of {', '.join(MODELS)}, or FILE.py:FUNCTION / MODULE:FUNCTION"
    )
    parser.add_argument(
        "--sys-path", action="append", default=[], metavar="DIR", help="put DIR on sys.path first (MODULE:FUNCTION)"
    )
    parser.add_argument("--mode", default="train", choices=["train", "infer"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--castore", action="store_true", help="serve the caches from castore (castore.torch.install())")
    parser.add_argument("--layers", type=int, default=None, help="number of layers (transformer, mlp, gpt2)")
    parser.add_argument("--batch", type=int, default=None, help="batch size of the example input")
    parser.add_argument("--save-megacache", metavar="PATH", help="after the first output, write torch.compiler.save_cache_artifacts() here")
    parser.add_argument("--load-megacache", metavar="PATH", help="torch.compiler.load_cache_artifacts() of PATH before compiling (timed)")
    parser.add_argument(
        "--fast-exit",
        action="store_true",
        help="after the result line (and castore's writes), leave without the interpreter's teardown (benchmarks: "
        "on the GPU machine the teardown of CUDA and the compile workers took 10 s a process, after the measurement)",
    )
    args = parser.parse_args(argv)
    if args.model not in MODELS and not is_factory(args.model):
        parser.error(f"--model {args.model!r}: one of {', '.join(MODELS)}, or FILE.py:FUNCTION / MODULE:FUNCTION")
    sys.path[:0] = args.sys_path
    THREAD_CPU.install()  # before torch's import, where castore's autoload starts its threads

    cuda = args.device.startswith("cuda")
    ptxas_count_file = install_ptxas_counter() if cuda else None

    import torch

    t_torch = time.time()  # under castore's autoload, install() ran inside this import
    autotune_counts = install_autotune_counters() if cuda else {}
    session = None
    if args.castore:
        import castore.torch

        session = castore.torch.install()
    t_ready = time.time()
    try:
        net, example = build(args.model, args.mode, args.device, layers=args.layers, batch=args.batch)
    except ModelSpecError as exc:
        parser.error(str(exc))
    if cuda:
        torch.cuda.synchronize()
    t_compile = time.time()
    megacache_load = None
    if args.load_megacache:
        with open(args.load_megacache, "rb") as f:
            blob = f.read()
        torch.compiler.load_cache_artifacts(blob)
        megacache_load = {"seconds": round(time.time() - t_compile, 3), "bytes": len(blob)}
    if args.model == "gpt2-autotune":
        import torch._inductor.config

        # Coordinate-descent tuning of every Triton kernel: the autotuning a warm start repeats without an autotune
        # cache (pytorch#172819), at a cold cost that fits a benchmark (max-autotune's GEMM search does not).
        torch._inductor.config.coordinate_descent_tuning = True
        compiled = torch.compile(net)
    else:
        compiled = torch.compile(net)
    inputs = example if isinstance(example, tuple) else (example,)
    if args.mode == "train":
        if args.model in ("gpt2", "gpt2-autotune"):
            out = compiled(example, labels=example)
            loss = out.loss
        else:
            out = compiled(*inputs)
            loss = _logits(out).float().pow(2).mean()
        loss.backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        digest_src = [_logits(out).detach()] + (grads if args.model in CPU_MODELS else grads[:4] + grads[-4:])
    else:
        with torch.no_grad():
            out = compiled(*inputs)
        digest_src = [_logits(out)]
    if cuda:
        torch.cuda.synchronize()
    t_first = time.time()
    cpu = cpu_seconds()

    from torch._dynamo.utils import counters

    try:  # PyTorch's own timers of its compile steps (cache lookups, kernel loads, waits on compile workers)
        from torch._dynamo.utils import compilation_time_metrics

        timed_steps = sorted(((k, sum(v), len(v)) for k, v in compilation_time_metrics.items()), key=lambda t: -t[1])
    except Exception:  # noqa: BLE001 - a diagnostic; absent or reshaped in some torch version
        timed_steps = []

    h = hashlib.sha256()
    for t in digest_src:
        h.update(t.detach().float().cpu().numpy().round(4).tobytes())
    result: dict[str, Any] = {
        "model": args.model,
        "mode": args.mode,
        "seconds_to_first_output": round(t_first - _T_START, 3),
        "seconds_compile": round(t_first - t_compile, 3),
        "seconds_import": round(t_ready - _T_START, 3),
        "seconds_torch_import": round(t_torch - _T_START, 3),
        "fxgraph": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph")},
        "aot_autograd": {k: v for k, v in counters["aot_autograd"].items() if k.startswith("autograd_cache")},
        "output_digest": h.hexdigest()[:16],
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "layers": args.layers,
        "batch": args.batch,
        # seconds and calls of the 30 longest: where the compile phase went, to compare modes (benchmarks/diag)
        "compile_steps": {k: [round(total, 3), n] for k, total, n in timed_steps[:30]},
        "inductor_counters": dict(counters["inductor"]),
        "cpu_seconds": cpu,
    }
    if cuda:
        result["triton_compiles"] = _count_lines(ptxas_count_file)
        result["autotune_calls"] = dict(autotune_counts)
        result["autotune_calls_total"] = sum(autotune_counts.values())
    if megacache_load is not None:
        result["megacache_load"] = megacache_load
    if args.save_megacache:
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            blob, _info = saved
            with open(args.save_megacache, "wb") as f:
                f.write(blob)
            result["megacache_saved_bytes"] = len(blob)
        else:
            result["megacache_saved_bytes"] = 0
    if session is not None:
        import castore.torch
        from castore.torch import artifacts

        session.flush(session.config.flush_timeout)
        result["compiler_runs"] = artifacts.compiler_runs
        from castore.torch import autotune_fixes

        result["autotune_fixes"] = dict(autotune_fixes.counters)
        result["castore"] = castore.torch.stats()
    print(json.dumps(result), flush=True)
    if args.fast_exit:
        if session is not None:
            session.close()  # the fetch plan and any write still queued, as at a normal exit
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
