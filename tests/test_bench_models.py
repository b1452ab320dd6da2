"""The benchmark's wider model set (castore.bench.zoo) builds, runs forward and backward, and says how it is
compiled: no compile here, a plain eager pass of each model at its CPU size."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.torch


@pytest.mark.parametrize("model", ["gpt-dynamic", "llama", "vit", "mlp-autotune"])
def test_each_wider_model_runs_forward_and_backward_on_every_example(model: str) -> None:
    import torch

    from castore.bench.models import build_runs, logits

    net, examples = build_runs(model, "train", "cpu")
    assert net.training
    for example in examples:
        out = logits(net(example))
        assert torch.isfinite(out).all()
        out.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_the_dynamic_model_runs_over_several_lengths_and_compiles_with_dynamic_shapes() -> None:
    from castore.bench.models import build, build_runs, compile_kwargs

    net, examples = build_runs("gpt-dynamic", "infer", "cpu")
    lengths = [x.shape[1] for x in examples]
    assert len(lengths) == 3 and len(set(lengths)) == 3
    assert build("gpt-dynamic", "infer", "cpu")[1].shape == examples[0].shape
    assert compile_kwargs("gpt-dynamic") == {"dynamic": True}
    assert compile_kwargs("mlp-autotune") == {"mode": "max-autotune-no-cudagraphs"}
    assert compile_kwargs("transformer") == {}
    assert not net.training


def test_the_default_model_sets_hold_the_classic_four_and_the_wider_four() -> None:
    from castore.bench.modes import CPU_MODELS, GPU_MODELS, WIDER_MODELS

    assert len(CPU_MODELS) == len(GPU_MODELS) == 8
    assert CPU_MODELS[4:] == GPU_MODELS[4:] == WIDER_MODELS
