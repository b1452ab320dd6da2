"""Your own model in the hot-load benchmark: ``castore bench --models FILE.py:FUNCTION[:phase]`` or
``MODULE:FUNCTION``, where FUNCTION returns (module, example inputs)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from castore.bench.modes import model_slug, resolve_model_spec, split_model_spec

# Two positional inputs and a tuple output: what the built-in models never exercise.
MODEL_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(16, 32)
            self.down = nn.Linear(32, 16)

        def forward(self, x, scale):
            return self.down(torch.relu(self.up(x))) * scale, x.sum()


    def make_model(device="cpu"):
        torch.manual_seed(0)
        return Block(), (torch.randn(4, 16), torch.tensor(2.0))


    def not_a_model():
        return 42
    """
)


def test_a_model_spec_splits_into_model_and_phase() -> None:
    assert split_model_spec("gpt2:train") == ("gpt2", "train")
    assert split_model_spec("gpt2") == ("gpt2", "infer")
    assert split_model_spec("nets/my_model.py:make") == ("nets/my_model.py:make", "infer")
    assert split_model_spec("nets/my_model.py:make:train") == ("nets/my_model.py:make", "train")
    assert split_model_spec("pkg.models:make:infer") == ("pkg.models:make", "infer")


def test_a_model_file_is_made_absolute_and_a_missing_one_refused(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    (tmp_path / "my_model.py").write_text(MODEL_FILE)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_spec("my_model.py:make_model:train") == f"{tmp_path}/my_model.py:make_model:train"
    assert resolve_model_spec("pkg.models:make") == "pkg.models:make:infer"  # a module is imported where it runs
    assert model_slug(f"{tmp_path}/my_model.py:make_model:train") == "my_model_make_model_train"
    with pytest.raises(SystemExit, match="no file"):
        resolve_model_spec("missing.py:make_model")


@pytest.mark.torch
def test_a_factory_is_found_by_file_and_by_module_and_its_result_checked(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    torch = pytest.importorskip("torch")
    from castore.bench.models import ModelSpecError, build

    (tmp_path / "my_model.py").write_text(MODEL_FILE)
    net, example = build(f"{tmp_path}/my_model.py:make_model", "train", "cpu")
    assert isinstance(net, torch.nn.Module) and net.training and len(example) == 2
    monkeypatch.syspath_prepend(str(tmp_path))
    net, example = build("my_model:make_model", "infer", "cpu")
    assert not net.training
    with pytest.raises(ModelSpecError, match=r"must return \(torch.nn.Module, example inputs\)"):
        build("my_model:not_a_model", "infer", "cpu")
    with pytest.raises(ModelSpecError, match="has no function"):
        build("my_model:nothing_here", "infer", "cpu")
    with pytest.raises(ModelSpecError, match="cannot import"):
        build("no_such_module_here:make_model", "infer", "cpu")


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.s3
@pytest.mark.timeout(600)
def test_castore_bench_measures_your_own_model(tmp_path) -> None:  # noqa: ANN001
    """End to end: a training step of a model from a file, given relative to where the benchmark starts."""
    (tmp_path / "my_model.py").write_text(MODEL_FILE)
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "castore.bench.hot_load", "--quick", "--models", "my_model.py:make_model:train",
         "--out", str(out), "--work-dir", str(tmp_path), "--timeout", "240"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "hot_load.json").read_text())
    label = f"{tmp_path}/my_model.py:make_model:train"
    assert report["models"] == [label]
    rows = {r["mode"]: r for r in report["summary"]}
    for mode in ("cold", "warm-local", "castore-hot", "castore-cold"):
        assert rows[mode]["ok"] == 1, (mode, rows[mode]["errors"], [r["stderr_tail"][-500:] for r in report["runs"]])
    assert rows["castore-hot"]["digests_match_writer"] is True and rows["castore-hot"]["digests_match_cold"] is True
    assert rows["warm-local"]["fx_hits"] >= 1  # forward and backward graphs come from the cold run's cache
    assert sorted(p.name for p in (out / "raw").iterdir())[0].startswith("my_model_make_model_train-")
    # PyTorch's own timers of the compile steps, per process, for benchmarks/diag/compile_steps.py
    hot = next(r for r in report["runs"] if r["mode"] == "castore-hot")
    steps = hot["result"]["compile_steps"]
    assert steps and all(seconds >= 0 and calls >= 1 for seconds, calls in steps.values())
    # and the CPU seconds of the process and of its compile workers, beside its wall times
    cpu = hot["result"]["cpu_seconds"]
    assert 0 < cpu["self"] and cpu["descendants"] is not None and cpu["descendants"] >= 0
    # of which the threads the process started, by name: castore's (its store open, gets, prefetch) among them
    assert any(name.startswith("castore") for name in cpu["threads"]), cpu["threads"]
    assert all(seconds >= 0 for seconds in cpu["threads"].values())
