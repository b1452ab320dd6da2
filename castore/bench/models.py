"""The models a measured process compiles: the built-in ones, and your own named FILE.py:FUNCTION or MODULE:FUNCTION.

FUNCTION() (or FUNCTION(device=...) where it takes a ``device``) returns ``(module, example)``, example being the
input tensor or a tuple of the module's positional inputs. torch is imported only when a model is built.
"""

from __future__ import annotations

import os
import sys
from typing import Any

CPU_MODELS = ["transformer", "cnn", "mlp"]
GPU_MODELS = ["gpt2", "gpt2-autotune", "resnet50"]
# Plain-torch shapes on every device (castore.bench.zoo): dynamic shapes over several lengths, a Llama-style
# decoder, a vision transformer, and an MLP compiled with max-autotune.
ZOO_MODELS = ["gpt-dynamic", "llama", "vit", "mlp-autotune"]
MODELS = CPU_MODELS + GPU_MODELS + ZOO_MODELS
# torch.compile's arguments per model (the rest compile with the defaults)
COMPILE_KWARGS: dict[str, dict[str, Any]] = {
    "gpt-dynamic": {"dynamic": True},
    "mlp-autotune": {"mode": "max-autotune-no-cudagraphs"},
}


def compile_kwargs(model: str) -> dict[str, Any]:
    """torch.compile's keyword arguments for a model."""
    return dict(COMPILE_KWARGS.get(model, {}))


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
    net, examples = build_runs(model, mode, device, layers=layers, batch=batch)
    return net, examples[0]


def build_runs(model: str, mode: str, device: str, *, layers: int | None = None, batch: int | None = None):  # noqa: ANN201
    """(module, [example inputs]): the inputs the measured process runs the compiled module on, in order (several
    for a dynamic-shape model, one for the others)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    dtype = None
    examples = None
    if is_factory(model):
        net, example = _build_from_factory(model, device)
        net.train(mode == "train")  # eval() for inference
        return net, [example]
    if model in ZOO_MODELS:
        from castore.bench import zoo

        scale = "small" if device == "cpu" else "full"
        if model == "gpt-dynamic":
            net, examples = zoo.gpt(scale, layers, batch)
        elif model == "llama":
            net, example = zoo.llama(scale, layers, batch)
        elif model == "vit":
            net, example = zoo.vit(scale, layers, batch)
        else:  # mlp-autotune: the mlp below, compiled with max-autotune
            net = nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.LayerNorm(256)) for _ in range(layers or 3)])
            example = torch.randn(batch or 32, 256)
        dtype = torch.bfloat16 if device != "cpu" else None
    elif model == "transformer":
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
    examples = [x.to(device) for x in (examples or [example])]
    if dtype is not None:
        net = net.to(dtype)
        examples = [x.to(dtype) if x.is_floating_point() else x for x in examples]
    if mode == "train":
        net.train()
    else:
        net.eval()
    return net, examples


def logits(out: Any) -> Any:
    """The tensor an output stands for: a Hugging Face output's logits, else the first tensor in it."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out:
        return logits(out[0])
    if isinstance(out, dict) and out:
        return logits(next(iter(out.values())))
    return out
