"""One process of the ahead-of-time tests: aot_compile a model through castore, run it, print one JSON line.

    AOT_MODEL=path/to/model.py   (defines make(batch) -> (module, inputs tuple))
    AOT_BATCH=4                  the example's batch size
    AOT_FAKE_TORCH=2.99.0        this process's fingerprint claims another torch version
    AOT_TRAIN=1                  compile and run with grad (a backward pass too)
    AOT_TWICE=1                  after the first, flush and aot_compile again (what a second process would find)
    AOT_HOOK=1                   a forward pre-hook on the module (scales its input by AOT_HOOK_SCALE, 0.5)
    AOT_SCALE_WEIGHTS=1.5        this process's weights differ from the writer's (a checkpoint loaded)
    AOT_GLOBALS='{"FLAG": true}' module-level globals of the model set before it is built (a flag set otherwise)
    AOT_THREADS=2                torch.set_num_threads before anything (a machine of another core count)
    AOT_AFTER_LOAD='{"threads": 1, "tf32": true}'
                                 set between aot_compile and the first call: the thread count, CUDA matmul TF32
    AOT_LATER_BATCHES=3,4        after the first call, call again with inputs of these batch sizes (reported as "later")
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import os
import sys

import torch

import castore.torch
from castore.torch import artifacts, fingerprint


def scaling_hook(scale: float):  # a hook made by a factory: its value lives in its closure
    def hook(_module, args):
        return tuple(a * scale for a in args)

    return hook


def main() -> None:
    if os.environ.get("AOT_FAKE_TORCH"):
        real = fingerprint.fingerprint
        fingerprint.fingerprint = lambda: {**real(), "torch": os.environ["AOT_FAKE_TORCH"]}  # type: ignore[assignment]
    sys.path.insert(0, os.path.dirname(os.path.abspath(os.environ["AOT_MODEL"])))  # the model's neighbours
    spec = importlib.util.spec_from_file_location("aot_model", os.environ["AOT_MODEL"])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["aot_model"] = module
    spec.loader.exec_module(module)
    for name, value in json.loads(os.environ.get("AOT_GLOBALS", "{}")).items():
        setattr(module, name, value)
    if os.environ.get("AOT_THREADS"):
        torch.set_num_threads(int(os.environ["AOT_THREADS"]))
    torch.manual_seed(0)
    net, inputs = module.make(int(os.environ.get("AOT_BATCH", "4")))
    train = os.environ.get("AOT_TRAIN") == "1"
    if os.environ.get("AOT_HOOK") == "1":
        net.register_forward_pre_hook(scaling_hook(float(os.environ.get("AOT_HOOK_SCALE", "0.5"))))
    if os.environ.get("AOT_SCALE_WEIGHTS"):
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(float(os.environ["AOT_SCALE_WEIGHTS"]))
    castore.torch.install()
    def counter(into: list[int]):  # a gc callback counting collections by generation
        def count(phase: str, info: dict) -> None:
            if phase == "start":
                into[min(int(info["generation"]), 2)] += 1

        return count

    collections = [0, 0, 0]  # automatic or explicit collections during aot_compile, by generation
    count = counter(collections)

    first_call = [0, 0, 0]  # the same during the compiled function's first call, the collector made eager
    count_first = counter(first_call)
    second_call = [0, 0, 0]
    count_second = counter(second_call)

    with torch.set_grad_enabled(train):
        expected = net(*inputs).detach()  # eager
        gc.collect()  # counts from zero: a pass of the middle generation in aot_compile is then the load's own
        gc.callbacks.append(count)
        compiled = castore.torch.aot_compile(net, inputs)
        gc.callbacks.remove(count)
        after_load = json.loads(os.environ.get("AOT_AFTER_LOAD", "{}"))
        if "threads" in after_load:
            torch.set_num_threads(int(after_load["threads"]))
        if "tf32" in after_load:
            torch.backends.cuda.matmul.allow_tf32 = bool(after_load["tf32"])
        thresholds = gc.get_threshold()
        gc.collect()  # every generation's count from zero: what follows collects by the call's allocations alone
        gc.set_threshold(50, 1, 1)  # a pass of every generation every few allocations, were it on
        gc.callbacks.append(count_first)
        try:
            out = compiled(*inputs)
        finally:
            gc.callbacks.remove(count_first)
        # The control: the second call runs with the collector on, under thresholds no call escapes (a young pass
        # at almost every allocation), so zero collections there would mean these counts see nothing.
        gc.set_threshold(1, 1, 1)
        gc.callbacks.append(count_second)
        try:
            compiled(*inputs)
        finally:
            gc.callbacks.remove(count_second)
            gc.set_threshold(*thresholds)
        if train:
            out.float().pow(2).mean().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    later = []
    for batch in [int(b) for b in os.environ.get("AOT_LATER_BATCHES", "").split(",") if b]:
        with torch.no_grad():
            more = module.make(batch)[1]
            got = compiled(*more)
            later.append({"batch": batch, "max_abs_diff": float((got - net(*more)).abs().max()),
                          "torch_compile_calls": compiled.torch_compile_calls})  # fmt: skip
    second = None
    if os.environ.get("AOT_TWICE") == "1":
        session = castore.torch.active_session()
        assert session is not None
        session.flush(120)
        with torch.set_grad_enabled(train):
            again = castore.torch.aot_compile(net, inputs)
            twice = again(*inputs).detach()
        second = {"source": again.source, "reason": again.reason, "fell_back": again.fell_back,
                  "max_abs_diff": float((twice - expected).abs().max())}  # fmt: skip
    from torch._dynamo.utils import compilation_time_metrics, counters

    h = hashlib.sha256()
    for t in [out.detach(), *grads]:
        h.update(t.float().numpy().round(4).tobytes())
    session = castore.torch.active_session()
    assert session is not None
    session.flush(120)
    print(json.dumps({
        "source": compiled.source,
        "reason": compiled.reason,
        "fell_back": compiled.fell_back,
        "later": later,
        "threads": torch.get_num_threads(),
        "key": compiled.key,
        "guards": compiled.guards,
        "digest": h.hexdigest()[:16],
        "max_abs_diff": float((out.detach() - expected).abs().max()),
        "grads": len(grads),
        "second": second,
        "frames": dict(counters["frames"]),
        "timed": sorted(compilation_time_metrics),
        "fxgraph": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph")},
        "compiler_runs": artifacts.compiler_runs,
        "stats": castore.torch.stats(),
        "namespace": session.namespace,
        "gc_collections_in_aot_compile": collections,
        "gc_collections_in_first_call": first_call,
        "gc_collections_in_second_call": second_call,
        "gc_enabled_after": gc.isenabled(),
    }), flush=True)


if __name__ == "__main__":
    main()
