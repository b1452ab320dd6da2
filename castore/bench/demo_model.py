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

import time

_T_START = time.time()

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

from castore.bench.counters import GC_TIME, THREAD_CPU, count_lines, cpu_seconds, install_autotune_counters, install_ptxas_counter  # noqa: E402
from castore.bench.models import CPU_MODELS, MODELS, ModelSpecError, build_runs, compile_kwargs, is_factory, logits  # noqa: E402


def call_inputs(example: Any, args: argparse.Namespace) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments the module is called with: a Hugging Face GPT-2 training step also
    takes its labels (and returns its loss)."""
    inputs = example if isinstance(example, tuple) else (example,)
    return inputs, {"labels": example} if args.mode == "train" and args.model in ("gpt2", "gpt2-autotune") else {}


def run_once(compiled: Any, net: Any, example: Any, args: argparse.Namespace) -> tuple[Any, list[Any]]:
    """One inference, or one training step (forward and backward), of the compiled module; returns its output and
    the tensors the output digest is taken of."""
    import torch

    inputs, kwargs = call_inputs(example, args)
    if args.mode == "train":
        for p in net.parameters():
            p.grad = None
        out = compiled(*inputs, **kwargs)
        loss = out.loss if kwargs else logits(out).float().pow(2).mean()
        loss.backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        return out, [logits(out).detach()] + (grads if args.model in CPU_MODELS else grads[:4] + grads[-4:])
    with torch.no_grad():
        out = compiled(*inputs)
    return out, [logits(out)]


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
    parser.add_argument("--aot", action="store_true", help="compile through castore.torch.aot_compile (the stored "
                        "ahead-of-time function, or compile and publish it) instead of torch.compile; implies --castore")
    parser.add_argument("--layers", type=int, default=None, help="number of layers (transformer, mlp, gpt2)")
    parser.add_argument("--batch", type=int, default=None, help="batch size of the example input")
    parser.add_argument("--save-megacache", metavar="PATH", help="after the first output, write torch.compiler.save_cache_artifacts() here")
    parser.add_argument("--load-megacache", metavar="PATH", help="torch.compiler.load_cache_artifacts() of PATH before compiling (timed)")
    parser.add_argument(
        "--fast-exit",
        action="store_true",
        help="after the result line (and castore's writes), leave without the interpreter's teardown (benchmarks: "
        "the teardown of CUDA and of the compile workers can take seconds, after the measurement)",
    )
    args = parser.parse_args(argv)
    args.castore = args.castore or args.aot
    if args.model not in MODELS and not is_factory(args.model):
        parser.error(f"--model {args.model!r}: one of {', '.join(MODELS)}, or FILE.py:FUNCTION / MODULE:FUNCTION")
    sys.path[:0] = args.sys_path
    THREAD_CPU.install()  # before torch's import, where castore's autoload starts its threads
    GC_TIME.install()

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
        net, examples = build_runs(args.model, args.mode, args.device, layers=args.layers, batch=args.batch)
    except ModelSpecError as exc:
        parser.error(str(exc))
    if cuda:
        torch.cuda.synchronize()
    t_compile = time.time()
    gc_before_compile = GC_TIME.snapshot(count_objects=False)
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
    aot_info = None
    if args.aot:  # timed as torch.compile is: the lookup, load or compile happen before the first output
        compiled, aot_info = _aot_compile(net, examples[0], args)
    else:
        compiled = torch.compile(net, **compile_kwargs(args.model))
    # A dynamic-shape model runs over several input lengths: its first output is that of the last one.
    for example in examples:
        out, digest_src = run_once(compiled, net, example, args)
    if cuda:
        torch.cuda.synchronize()
    t_first = time.time()
    gc_total = GC_TIME.snapshot()
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
        # each digested tensor's sum and sum of magnitudes in float64: compared with a tolerance where kernels that
        # accumulate with atomic adds (an embedding's gradient) make two runs of the same code differ in the last bits
        "output_sums": [[float(t.detach().double().sum()), float(t.detach().double().abs().sum())] for t in digest_src],
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "layers": args.layers,
        "batch": args.batch,
        # seconds and calls of the 30 longest: where the compile phase went, to compare modes (benchmarks/diag)
        "compile_steps": {k: [round(total, 3), n] for k, total, n in timed_steps[:30]},
        "inductor_counters": dict(counters["inductor"]),
        "cpu_seconds": cpu,
        # the collector's time to the first output, and the compile phase's part; objects tracked at the end
        "gc": {**gc_total, "seconds_compile": round(gc_total["seconds"] - gc_before_compile["seconds"], 3)},
    }
    if cuda:
        result["triton_compiles"] = count_lines(ptxas_count_file)
        result["autotune_calls"] = dict(autotune_counts)
        result["autotune_calls_total"] = sum(autotune_counts.values())
    if megacache_load is not None:
        result["megacache_load"] = megacache_load
    if aot_info is not None:
        result["aot"] = aot_info
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


def _aot_compile(net: Any, example: Any, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """castore.torch.aot_compile with the inputs, grad mode and torch.compile arguments of the calls that follow."""
    import torch

    import castore.torch

    inputs, kwargs = call_inputs(example, args)
    compile_args = compile_kwargs(args.model)
    with torch.set_grad_enabled(args.mode == "train"):
        fn = castore.torch.aot_compile(net, inputs, kwargs, dynamic=compile_args.get("dynamic"), mode=compile_args.get("mode"))
    info = {"source": fn.source, "reason": fn.reason, "seconds": round(fn.seconds, 3), "key": fn.key}
    return fn, info


if __name__ == "__main__":
    main()
