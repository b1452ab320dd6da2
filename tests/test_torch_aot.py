"""Ahead-of-time compiled functions served from the store (castore.torch.aot_compile), each machine a fresh process.

A CI machine compiles a small module ahead of time into a file:// store, signing what it publishes. Fresh machines
(empty Inductor, Triton, temp and castore dirs) that trust its key then: load it and compile nothing; miss on a
changed forward, changed input shapes or another torch version; never load it when a function it traced changed
outside the key's files; never run the writer's branch where a module-level flag differs (its guard is kept); load
code that names its module's globals; compile their own where the thread count differs and their C++ kernels hold it,
load at any count where the code does not depend on it; fall back to torch.compile, with one log line, for a model
that cannot be serialized; never unpickle an artifact planted without the key. Through SeaweedFS: `castore prewarm`
and `castore pull` carry a training step's artifact to an offline machine.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from castore.signing import SecretKey, write_key_pair

pytestmark = [pytest.mark.torch, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "scripts" / "aot_worker.py"
NOT_AHEAD = "is not compiled ahead of time"  # castore's fallback log line

MODEL = """\
import torch
from torch import nn

from aot_helper import scale


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        y = torch.relu(self.fc(x))
        return scale(y)


def make(batch):
    return Net(), (torch.randn(batch, 16),)
"""
HELPER = "def scale(y):\n    return y * 2\n"
GRAPH_BREAK_MODEL = MODEL.replace("        return scale(y)", "        torch._dynamo.graph_break()\n        return scale(y)")


class _Exec:
    """Unpickling this runs ``code``: what a malicious artifact does."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (self.code,))


def write_model(directory: Path, model: str = MODEL, helper: str = HELPER) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.py").write_text(model)
    (directory / "aot_helper.py").write_text(helper)
    return directory / "model.py"


def machine(root: Path, **extra: str) -> dict[str, str]:
    """A fresh host's environment: empty Inductor, Triton, temp, castore and config dirs."""
    drop = ("CASTORE_", "TORCHINDUCTOR_", "TORCH_", "TRITON_", "AWS_", "AOT_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k not in ("PYTHONPATH", "XDG_CONFIG_HOME")}
    for name, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton"), ("TMPDIR", "tmp"),
                      ("CASTORE_CACHE_DIR", "castore"), ("XDG_CONFIG_HOME", "xdg")):  # fmt: skip
        (root / sub).mkdir(parents=True, exist_ok=True)
        env[name] = str(root / sub)
    env.update(PYTHONPATH=str(ROOT), TORCHINDUCTOR_COMPILE_THREADS="1", CASTORE_SLOW_REQUEST="120")
    env.update(extra)
    return env


def run_worker(env: dict[str, str], *, prefix: list[str] | None = None) -> tuple[dict[str, Any], str, str]:
    proc = subprocess.run([*(prefix or []), sys.executable, str(WORKER)], env=env, cwd=env["TMPDIR"], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"source"')]
    assert lines, proc.stdout[-3000:]
    return json.loads(lines[-1]), proc.stdout, proc.stderr


def compiled_nothing(result: dict[str, Any]) -> list[str]:
    """What a load that compiled nothing must not show: Dynamo's capture, an FX graph miss, a C++ compiler run."""
    found = [name for name in ("fullgraph_capture", "bytecode_tracing", "compile_fx_inner") if name in result["timed"]]
    if result["fxgraph"].get("fxgraph_cache_miss"):
        found.append(f"fxgraph_cache_miss {result['fxgraph']['fxgraph_cache_miss']}")
    if result["compiler_runs"]:
        found.append(f"compiler_runs {result['compiler_runs']}")
    return found


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """CI: compiles the model ahead of time into a fresh file:// store, signing everything it publishes."""
    root = tmp_path_factory.mktemp("aot")
    key = SecretKey.generate("ci-aot")
    secret_path, _ = write_key_pair(key, root / "keys")
    model = write_model(root / "src")
    store = root / "store"
    env = machine(root / "ci", CASTORE_URL=f"file://{store}", CASTORE_SIGNING_KEY=str(secret_path), AOT_MODEL=str(model))
    result, _, _ = run_worker(env)
    assert result["source"] == "compiled", result
    assert result["max_abs_diff"] < 1e-5 and result["compiler_runs"] > 0, result
    assert result["stats"]["caches"]["aot-function"]["puts"] == 1, result["stats"]
    return {"root": root, "store": store, "model": model, "public": key.public.text(), "result": result}


def fleet(published: dict[str, Any], root: Path, **extra: str) -> dict[str, str]:
    """A fresh fleet machine: the CI's public key (signatures required), read-only."""
    settings = {"AOT_MODEL": str(published["model"]), "CASTORE_URL": f"file://{published['store']}",
                "CASTORE_TRUSTED_KEYS": published["public"], "CASTORE_READ_ONLY": "1", **extra}  # fmt: skip
    return machine(root, **settings)


def test_a_fresh_machine_loads_the_stored_function_and_compiles_nothing(published: dict[str, Any], tmp_path: Path) -> None:
    ci = published["result"]
    result, _, stderr = run_worker(fleet(published, tmp_path))
    print(f"\nfresh machine: source {result['source']}, timed steps {result['timed']}, fxgraph {result['fxgraph']}")
    assert result["source"] == "store", (result, stderr[-3000:])
    assert result["key"] == ci["key"] and result["digest"] == ci["digest"] and result["max_abs_diff"] < 1e-5
    assert not compiled_nothing(result), compiled_nothing(result)
    assert compiled_nothing(ci), "the writer must have compiled (else this test proves nothing)"
    # The load ran with the cyclic collector held off (the young generation's pass right after is its return) and
    # left it on; the writer's compile ran with it, full passes included.
    print(f"collections in aot_compile: fresh {result['gc_collections_in_aot_compile']}, writer {ci['gc_collections_in_aot_compile']}")
    assert result["gc_collections_in_aot_compile"][1:] == [0, 0] and result["gc_enabled_after"], result
    assert ci["gc_collections_in_aot_compile"][2] > 0 and ci["gc_enabled_after"], ci
    # So did the loaded function's first call: from counts at zero, under thresholds that collect after 50
    # allocations (its load's last part, Inductor's kernels set up, allocates more: two young passes without the
    # pause), nothing. The second calls, under thresholds no call escapes, are the control: the counts see
    # collections, and the collector is back on.
    print(f"collections in the first call: fresh {result['gc_collections_in_first_call']}, writer {ci['gc_collections_in_first_call']}")
    assert result["gc_collections_in_first_call"] == [0, 0, 0], result
    print(f"collections in the second call: fresh {result['gc_collections_in_second_call']}, writer {ci['gc_collections_in_second_call']}")
    assert sum(result["gc_collections_in_second_call"]) > 0 and sum(ci["gc_collections_in_second_call"]) > 0, (result, ci)
    kept, dropped = result["guards"]["kept"], result["guards"]["dropped"]
    assert kept.get("TENSOR_MATCH") and kept.get("GLOBAL_STATE") and kept.get("SHAPE_ENV"), kept
    assert dropped.get("MODULE_MATCH"), dropped  # the globals' guards: objects of the writer's process


def test_the_loaded_function_reads_this_processs_parameters(published: dict[str, Any], tmp_path: Path) -> None:
    """Weights are inputs of the compiled graph, not constants of the artifact: a checkpoint loaded after the
    writer compiled is what the loaded function computes with."""
    result, _, _ = run_worker(fleet(published, tmp_path, AOT_SCALE_WEIGHTS="1.5"))
    assert result["source"] == "store" and result["key"] == published["result"]["key"], result
    assert result["max_abs_diff"] < 1e-5 and result["digest"] != published["result"]["digest"], result


def test_a_module_with_hooks_is_compiled_through_its_call(tmp_path: Path) -> None:
    """A forward pre-hook runs in the compiled function, stored and loaded alike, and the function called with the
    forward's arguments runs the stored code (it was once given the module too, and its guards sent every call to
    torch.compile)."""
    model = write_model(tmp_path / "src")
    env = machine(tmp_path / "m", CASTORE_URL=f"file://{tmp_path / 'store'}", AOT_MODEL=str(model), AOT_HOOK="1",
                  AOT_TWICE="1")  # fmt: skip
    result, _, _ = run_worker(env)
    assert result["source"] == "compiled" and result["max_abs_diff"] < 1e-5 and not result["fell_back"], result
    second = result["second"]
    assert second["source"] == "store" and second["max_abs_diff"] < 1e-5 and not second["fell_back"], second
    # A hook made with another value (its closure) is another key: never the writer's scaling.
    other, _, _ = run_worker({**env, "AOT_HOOK_SCALE": "0.25", "AOT_TWICE": "0"})
    assert other["key"] != result["key"] and other["source"] == "compiled" and other["max_abs_diff"] < 1e-5, other
    # A module of torch's own classes: Dynamo traces a wrapper that takes the forward's arguments alone.
    torch_classes = write_model(tmp_path / "seq", "import torch\nfrom torch import nn\n\n\ndef make(batch):\n"
                                "    return nn.Sequential(nn.Linear(16, 16), nn.ReLU()), (torch.randn(batch, 16),)\n")  # fmt: skip
    seq, _, _ = run_worker({**env, "AOT_MODEL": str(torch_classes)})
    assert seq["source"] == "compiled" and seq["max_abs_diff"] < 1e-5 and not seq["fell_back"], seq
    assert seq["second"]["source"] == "store" and not seq["second"]["fell_back"], seq["second"]


FLAG_MODEL = """\
import torch
from torch import nn

FLAG = False  # a module-level setting the forward branches on


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        y = self.fc(x)
        return torch.relu(y) if FLAG else torch.sigmoid(y)


def make(batch):
    return Net(), (torch.randn(batch, 16),)
"""

RECOMPILED_MODEL = """\
import os

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.scale = 2.0

    def forward(self, x):
        return self.fc(x) * self.scale


def make(batch):
    net, x = Net(), torch.randn(batch, 16)
    if os.environ.get("RECOMPILE_FIRST") == "1":
        # torch.compile of the same forward, recompiled for another scale: Dynamo makes the float dynamic in this
        # process, and the bytecode it writes for it from then on names the module's global `torch`
        compiled = torch.compile(Net.forward)
        compiled(net, x)
        net.scale = 3.0
        compiled(net, x)
        net.scale = 2.0
    return net, (x,)
"""


def test_a_module_level_flag_set_otherwise_on_the_reader_never_runs_the_writers_trace(tmp_path: Path) -> None:
    """The key cannot cover the globals a trace reads (they are known only once traced): the guard on the flag's
    value is kept in the artifact and checked against the reader's module, so a reader whose flag differs finds
    the same key, loads it, and runs torch.compile instead of the writer's branch."""
    model = write_model(tmp_path / "src", FLAG_MODEL)
    store = tmp_path / "store"
    writer, _, _ = run_worker(machine(tmp_path / "w", CASTORE_URL=f"file://{store}", AOT_MODEL=str(model)))
    assert writer["source"] == "compiled" and writer["max_abs_diff"] < 1e-5, writer
    assert writer["guards"]["kept"].get("CONSTANT_MATCH"), writer["guards"]  # the flag's, among others
    same, _, _ = run_worker(machine(tmp_path / "same", CASTORE_URL=f"file://{store}", AOT_MODEL=str(model)))
    assert same["source"] == "store" and same["max_abs_diff"] < 1e-5 and same["digest"] == writer["digest"], same
    flipped, _, stderr = run_worker(machine(tmp_path / "flipped", CASTORE_URL=f"file://{store}", AOT_MODEL=str(model),
                                            AOT_GLOBALS='{"FLAG": true}', CASTORE_LOG="info"))  # fmt: skip
    assert flipped["key"] == writer["key"] and flipped["source"] == "store", flipped
    assert flipped["max_abs_diff"] < 1e-5 and flipped["digest"] != writer["digest"], flipped
    assert "guards reject these inputs (G['FLAG'] == False" in stderr, stderr[-3000:]


def test_code_traced_after_a_recompile_loads_with_its_modules_globals(tmp_path: Path) -> None:
    """A writer whose process had recompiled the forward for another float attribute writes bytecode that names
    the global `torch` without carrying it: a reader loads it with the traced function's module globals."""
    model = write_model(tmp_path / "src", RECOMPILED_MODEL)
    store = tmp_path / "store"
    writer, _, _ = run_worker(machine(tmp_path / "w", CASTORE_URL=f"file://{store}", AOT_MODEL=str(model),
                                      RECOMPILE_FIRST="1"))  # fmt: skip
    assert writer["source"] == "compiled" and writer["max_abs_diff"] < 1e-5, writer
    reader, _, stderr = run_worker(machine(tmp_path / "r", CASTORE_URL=f"file://{store}", AOT_MODEL=str(model),
                                           CASTORE_LOG="info"))  # fmt: skip
    assert reader["key"] == writer["key"], (reader["key"], writer["key"])
    assert reader["source"] == "store" and reader["max_abs_diff"] < 1e-5, (reader, stderr[-3000:])


def test_where_cpp_kernels_hold_the_thread_count_another_count_compiles_its_own(tmp_path: Path) -> None:
    """Inductor writes torch.get_num_threads() into its C++ kernels and Dynamo's global-state guard checks it: a
    machine of another count (a torchrun worker at OMP_NUM_THREADS=1) finds a key of its own, compiles and
    publishes for it, instead of loading an artifact whose guard rejects its every call."""
    model = write_model(tmp_path / "src")
    url = f"file://{tmp_path / 'store'}"
    writer, _, _ = run_worker(machine(tmp_path / "w", CASTORE_URL=url, AOT_MODEL=str(model), AOT_THREADS="2"))
    assert writer["source"] == "compiled" and writer["threads"] == 2 and not writer["fell_back"], writer
    assert writer["guards"]["kept"].get("GLOBAL_STATE") and "global_state" not in writer["guards"], writer["guards"]
    one, _, _ = run_worker(machine(tmp_path / "one", CASTORE_URL=url, AOT_MODEL=str(model), AOT_THREADS="1"))
    assert one["key"] != writer["key"] and one["source"] == "compiled" and not one["fell_back"], one
    again, _, _ = run_worker(machine(tmp_path / "again", CASTORE_URL=url, AOT_MODEL=str(model), AOT_THREADS="1"))
    assert again["key"] == one["key"] and again["source"] == "store" and not again["fell_back"], again
    assert again["max_abs_diff"] < 1e-5 and again["digest"] == writer["digest"], again


def test_code_that_reads_the_thread_count_at_run_time_loads_at_any_count(tmp_path: Path) -> None:
    """With cpp.dynamic_threads (or an accelerator's graph) the compiled code does not depend on the thread count:
    the key leaves it out, and castore checks the rest of Dynamo's global state at each call, so a machine of
    another count loads the artifact and runs it, a count changed after the load included; another global state
    (TF32 matmuls switched on) still makes the call fall back to torch.compile, with one log line."""
    model = write_model(tmp_path / "src")
    common = {"CASTORE_URL": f"file://{tmp_path / 'store'}", "AOT_MODEL": str(model),
              "TORCHINDUCTOR_CPP_DYNAMIC_THREADS": "1"}  # fmt: skip
    writer, _, _ = run_worker(machine(tmp_path / "w", AOT_THREADS="2", **common))
    assert writer["source"] == "compiled" and not writer["fell_back"], writer
    assert writer["guards"]["global_state"] == "castore, without num_threads", writer["guards"]
    assert writer["guards"]["dropped"].get("GLOBAL_STATE") == 1 and not writer["guards"]["kept"].get("GLOBAL_STATE")
    reader, _, stderr = run_worker(machine(tmp_path / "r", AOT_THREADS="1", **common))
    assert reader["key"] == writer["key"] and reader["source"] == "store", (reader, stderr[-3000:])
    assert not reader["fell_back"], (reader, stderr[-3000:])
    assert reader["max_abs_diff"] < 1e-5 and reader["digest"] == writer["digest"] and reader["threads"] == 1, reader
    assert not compiled_nothing(reader), compiled_nothing(reader)
    later, _, _ = run_worker(machine(tmp_path / "later", AOT_THREADS="1", AOT_AFTER_LOAD='{"threads": 2}', **common))
    assert later["source"] == "store" and not later["fell_back"] and later["threads"] == 2, later
    tf32, _, stderr = run_worker(machine(tmp_path / "tf32", AOT_AFTER_LOAD='{"tf32": true}', CASTORE_LOG="info",
                                         **common))  # fmt: skip
    assert tf32["source"] == "store" and tf32["fell_back"] and tf32["max_abs_diff"] < 1e-5, tf32
    assert stderr.count("global state differs") == 1 and "allow_tf32: False -> True" in stderr, stderr[-3000:]


def test_inputs_the_guards_reject_go_to_torch_compile_and_the_rest_still_run_the_stored_function(
        published: dict[str, Any], tmp_path: Path) -> None:  # fmt: skip
    """An epoch's smaller last batch: that call runs torch.compile (one log line), and the usual batch after it runs
    the stored function again, not a second compile."""
    result, _, stderr = run_worker(fleet(published, tmp_path, AOT_LATER_BATCHES="3,4,3,4", CASTORE_LOG="info"))
    assert result["source"] == "store", result
    later = result["later"]
    assert [r["torch_compile_calls"] for r in later] == [1, 1, 2, 2], later
    assert all(r["max_abs_diff"] < 1e-5 for r in later), later
    assert result["frames"].get("ok") == 1, result["frames"]  # Dynamo traced the batch of 3 alone
    assert stderr.count("guards reject these inputs") == 1, stderr[-3000:]


CLOSURE_SCRIPT = """\
import json, sys, torch, castore.torch

def make(op, bias, table):
    def fn(x, scale=torch.full((4,), bias)):
        return op(x) * scale + table[-1]
    return fn

table = [0.0] * 20_000  # longer than the key describes item by item
table[-1] = float(sys.argv[3])
fn = make({"relu": torch.relu, "sigmoid": torch.sigmoid}[sys.argv[1]], float(sys.argv[2]), table)
x = torch.randn(2, 4)
with torch.no_grad():
    compiled = castore.torch.aot_compile(fn, (x,))
    diff = float((compiled(x) - fn(x)).abs().max())
castore.torch.active_session().flush(120)
print(json.dumps({"source": compiled.source, "key": compiled.key, "max_abs_diff": diff}))
"""


def test_a_function_made_with_other_closure_values_or_defaults_never_runs_the_writers(tmp_path: Path) -> None:
    """PyTorch pickles the writer's closure into the artifact and binds the stored signature's defaults: a reader whose
    function closes over another op, or has another tensor default, would compute with the writer's. Those values are
    in the key; one the key describes by size alone (a long list) is compared with the stored one before the load."""
    script = tmp_path / "closure.py"
    script.write_text(CLOSURE_SCRIPT)
    url = f"file://{tmp_path / 'store'}"

    def run(name: str, *argv: str) -> tuple[dict[str, Any], str]:
        env = machine(tmp_path / name, CASTORE_URL=url, CASTORE_LOG="info")
        proc = subprocess.run([sys.executable, str(script), *argv], env=env, cwd=env["TMPDIR"], capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr

    writer, _ = run("w", "relu", "1", "5")
    assert writer["source"] == "compiled" and writer["max_abs_diff"] < 1e-5, writer
    for name, argv in (("op", ("sigmoid", "1", "5")), ("default", ("relu", "2", "5"))):
        other, _ = run(name, *argv)
        assert other["key"] != writer["key"] and other["source"] == "compiled" and other["max_abs_diff"] < 1e-5, other
    same, _ = run("same", "relu", "1", "5")
    assert same["key"] == writer["key"] and same["source"] == "store" and same["max_abs_diff"] < 1e-5, same
    last_item, stderr = run("table", "relu", "1", "7")
    assert last_item["key"] == writer["key"] and last_item["source"] == "compiled", last_item
    assert last_item["max_abs_diff"] < 1e-5 and "stale (closure value 'table' differs)" in stderr, stderr[-3000:]


def test_a_changed_forward_misses(published: dict[str, Any], tmp_path: Path) -> None:
    changed = MODEL.replace("y = torch.relu(self.fc(x))", "y = torch.sigmoid(self.fc(x))")
    assert changed != MODEL
    model = write_model(tmp_path / "src", changed)
    result, _, _ = run_worker(fleet(published, tmp_path / "m", AOT_MODEL=str(model)))
    assert result["key"] != published["result"]["key"]
    assert result["source"] == "compiled" and result["max_abs_diff"] < 1e-5, result
    assert result["digest"] != published["result"]["digest"]


def test_a_changed_function_outside_the_keys_files_is_never_loaded(published: dict[str, Any], tmp_path: Path) -> None:
    """The helper's file is not part of the key (only the module classes' files are): the same key is found, and the
    check of the traced sources refuses it before it is loaded."""
    model = write_model(tmp_path / "src", MODEL, HELPER.replace("y * 2", "y * 3"))
    result, _, stderr = run_worker(fleet(published, tmp_path / "m", AOT_MODEL=str(model), CASTORE_LOG="info"))
    assert result["key"] == published["result"]["key"]
    assert result["source"] == "compiled" and result["max_abs_diff"] < 1e-5, result
    assert "stale (aot_helper lines" in stderr, stderr[-3000:]


def test_changed_input_shapes_miss(published: dict[str, Any], tmp_path: Path) -> None:
    result, _, _ = run_worker(fleet(published, tmp_path, AOT_BATCH="8"))
    assert result["key"] != published["result"]["key"]
    assert result["source"] == "compiled" and result["max_abs_diff"] < 1e-5, result


def test_another_torch_version_misses(published: dict[str, Any], tmp_path: Path) -> None:
    result, _, _ = run_worker(fleet(published, tmp_path, AOT_FAKE_TORCH="2.99.0"))
    assert result["key"] != published["result"]["key"]
    assert result["source"] == "compiled" and result["max_abs_diff"] < 1e-5, result


def test_a_model_that_cannot_be_serialized_falls_back_with_one_log_line(tmp_path: Path) -> None:
    model = write_model(tmp_path / "src", GRAPH_BREAK_MODEL)
    env = machine(tmp_path / "m", CASTORE_URL=f"file://{tmp_path / 'store'}", AOT_MODEL=str(model), AOT_TWICE="1")
    result, _, stderr = run_worker(env)
    lines = [line for line in stderr.splitlines() if NOT_AHEAD in line]
    print(f"\nfallback: {lines}")
    assert result["source"] == "fallback" and result["max_abs_diff"] < 1e-5, result
    assert "graph" in result["reason"].lower(), result["reason"]
    # The second call read what the first recorded: no second attempt; each call said so once.
    assert result["second"]["source"] == "fallback" and result["second"]["reason"].startswith("recorded in the store")
    assert len(lines) == 2 and NOT_AHEAD in lines[0] and "recorded in the store" in lines[1], lines


def test_an_artifact_planted_without_the_signing_key_is_never_loaded(published: dict[str, Any], tmp_path: Path) -> None:
    import castore
    from castore.torch.precompiled import CACHE, encode_value

    store_dir = tmp_path / "store"
    shutil.copytree(published["store"], store_dir)
    marker = tmp_path / "planted-ran"
    payload = pickle.dumps(_Exec(f"open({str(marker)!r}, 'a').write('ran\\n'); raise RuntimeError('planted')"))
    planted = encode_value({"target": "aot_model.Net", "guards": {}, "sources": []}, payload)
    ns = published["result"]["namespace"]
    with castore.open_store(f"file://{store_dir}", cache_size=0) as attacker:  # bucket access, no key
        attacker.put(ns, published["result"]["key"], planted, meta={"artifact": CACHE}, overwrite=True)

    trusted = fleet(published, tmp_path / "fleet", CASTORE_URL=f"file://{store_dir}")
    result, _, stderr = run_worker(trusted)
    assert not marker.exists(), "a planted artifact was unpickled"
    assert result["source"] == "compiled" and result["max_abs_diff"] < 1e-5, result
    assert "untrusted entry treated as a miss" in stderr, stderr[-3000:]

    # The control: a machine without keys unpickles it (so the assertion above can fail), then compiles.
    control = machine(tmp_path / "control", CASTORE_URL=f"file://{store_dir}", CASTORE_READ_ONLY="1",
                      AOT_MODEL=str(published["model"]))  # fmt: skip
    result, _, _ = run_worker(control)
    assert marker.exists(), "the control did not load the planted artifact: the test would prove nothing"
    assert result["source"] == "compiled" and result["max_abs_diff"] < 1e-5, result


def test_castore_stat_shows_the_guards_kept_and_dropped(published: dict[str, Any], tmp_path: Path) -> None:
    env = machine(tmp_path, CASTORE_TRUSTED_KEYS=published["public"])
    args = ["--url", f"file://{published['store']}", "stat", published["result"]["namespace"], published["result"]["key"]]
    proc = subprocess.run([sys.executable, "-m", "castore", *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    print("\n" + proc.stdout)
    assert "guards kept:" in proc.stdout and "TENSOR_MATCH" in proc.stdout, proc.stdout
    assert "guards dropped:" in proc.stdout and "MODULE_MATCH" in proc.stdout, proc.stdout
    assert "aot.key.code" in proc.stdout and "trusted:     yes" in proc.stdout, proc.stdout
    assert "global state checked by: Dynamo's guard" in proc.stdout, proc.stdout  # a CPU graph: the count in its key


@pytest.mark.s3
def test_prewarm_and_pull_carry_a_training_steps_function(seaweedfs: Any, tmp_path: Path) -> None:
    """CI prewarms a training step through SeaweedFS; an image pulls the bundle; the offline machine loads the
    artifact (forward and backward) from the pulled directory and compiles nothing."""
    model = write_model(tmp_path / "src")
    url = seaweedfs.url(seaweedfs.create_bucket(), "ci")
    builder = machine(tmp_path / "ci", AOT_MODEL=str(model), AOT_TRAIN="1", **seaweedfs.env())
    prewarm = [sys.executable, "-m", "castore", "--url", url, "prewarm", "--name", "aot"]
    cold, stdout, stderr = run_worker(builder, prefix=[*prewarm, "--"])
    assert cold["source"] == "compiled" and cold["grads"] == 2, cold
    assert "published bundle aot@1" in stdout + stderr, stderr[-3000:]

    puller = machine(tmp_path / "puller", **seaweedfs.env(read_only=True))
    target = tmp_path / "image"
    pull = subprocess.run([sys.executable, "-m", "castore", "--url", url, "pull", "aot", "--into", str(target), "--json"],
                          env=puller, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert pull.returncode == 0, pull.stderr
    report = json.loads(pull.stdout)
    assert report["aot_functions"] == 1, report

    node = machine(tmp_path / "node", AOT_MODEL=str(model), AOT_TRAIN="1")
    node.pop("CASTORE_CACHE_DIR")
    warm, _, stderr = run_worker(node, prefix=["sh", "-c", '. "$1" && shift && exec "$@"', "sh", str(target / "env.sh")])
    assert warm["source"] == "store", (warm, stderr[-3000:])
    assert warm["digest"] == cold["digest"] and warm["grads"] == 2, (warm, cold)  # outputs and gradients
    assert not compiled_nothing(warm), compiled_nothing(warm)


# -- the key and the value, in this process (no compile) -------------------------------------------------------------
@pytest.mark.torch
class TestKeyAndValue:
    """Fast checks of what the key covers and of the value's header; the processes above prove the behaviour."""

    def _key(self, target: Any, *args: Any, **kw: Any) -> Any:
        from castore.torch.precompiled import compute_key

        return compute_key(target, args, {}, **kw)

    def test_each_component_changes_only_its_own_digest(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        import importlib.util

        import torch

        model = write_model(tmp_path / "src")
        monkeypatch.syspath_prepend(str(model.parent))
        spec = importlib.util.spec_from_file_location("aot_key_model", model)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, "aot_key_model", module)  # where inspect finds a class's file
        spec.loader.exec_module(module)
        net, (x,) = module.make(4)
        base = self._key(net, x)
        assert base.key.startswith("aot.") and base.key == self._key(net, x).key  # stable
        differing = {
            "inputs": self._key(net, torch.randn(8, 16)),
            "parameters": self._key(net.double(), x.double()),
            "settings": self._key(net.float(), x, dynamic=True),
        }
        with torch.no_grad():
            differing["settings-grad"] = self._key(net, x)
        for name, other in differing.items():
            component = name.split("-")[0]
            assert other.key != base.key, name
            assert other.components[component] != base.components[component], name
        assert differing["parameters"].components["inputs"] != base.components["inputs"]  # float64 input too
        assert differing["settings"].components["code"] == base.components["code"]

        (tmp_path / "src" / "model.py").write_text(MODEL.replace("torch.relu", "torch.tanh"))
        from castore.torch import aot_key

        aot_key._file_digest.cache_clear()
        changed = self._key(net, x)
        assert changed.components["code"] != base.components["code"] and changed.key != base.key

    def test_dynamic_dimensions_are_keyed_by_their_rank_not_their_size(self) -> None:
        import torch

        from castore.torch.aot_key import input_specs

        a, b = torch.randn(4, 16), torch.randn(8, 16)
        assert input_specs((a,), {}, True) == input_specs((b,), {}, True)
        assert input_specs((a,), {}, None) != input_specs((b,), {}, None)
        assert input_specs((torch.randn(1, 16),), {}, True) != input_specs((a,), {}, True)  # 1 is specialized
        marked = torch.randn(4, 16)
        torch._dynamo.mark_dynamic(marked, 0)
        assert "s,16" in input_specs((marked,), {}, None) and "dynamic[0]" in input_specs((marked,), {}, None)

    def test_the_fingerprints_torch_version_is_part_of_the_key(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from castore.torch import fingerprint

        fn = torch_function
        base = self._key(fn, 1.0)
        real = fingerprint.fingerprint
        monkeypatch.setattr(fingerprint, "fingerprint", lambda: {**real(), "torch": "2.99.0"})
        other = self._key(fn, 1.0)
        assert other.components["environment"] != base.components["environment"] and other.key != base.key
        assert other.components["code"] == base.components["code"]

    def test_a_value_of_another_format_or_cut_short_is_refused(self) -> None:
        from castore.torch.precompiled import MAGIC, decode_value, encode_value

        value = encode_value({"target": "t", "sources": []}, b"payload")
        header, payload = decode_value(value)
        assert header["target"] == "t" and header["v"] == 1 and payload == b"payload"
        for bad in (b"", b"pickle data", value[: len(MAGIC) + 6], value.replace(b'"v":1', b'"v":2'), MAGIC + b"\xff\xff\xff\xff"):
            with pytest.raises(ValueError):
                decode_value(bad)

    def test_a_traced_function_changed_since_the_artifact_was_written_is_found(self, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
        import importlib
        import linecache

        from castore.torch.precompiled import _digest, stale_source

        (tmp_path / "aot_stale_helper.py").write_text(HELPER)
        monkeypatch.syspath_prepend(str(tmp_path))
        importlib.import_module("aot_stale_helper")
        recorded = [["aot_stale_helper", 1, 3, _digest(HELPER)]]
        assert stale_source(recorded) is None
        (tmp_path / "aot_stale_helper.py").write_text(HELPER.replace("y * 2", "y * 3"))
        linecache.checkcache()
        assert stale_source(recorded) == "aot_stale_helper lines 1-3 changed"
        assert stale_source([["no_such_module_anywhere", 1, 2, "0"]]) is not None


def torch_function(x: float) -> float:
    return x * 2


@pytest.mark.torch
def test_closure_values_module_attributes_and_submodule_classes_are_part_of_the_key() -> None:
    import torch

    from castore.torch.precompiled import compute_key

    def make(scale: float) -> Any:
        def fn(x: Any) -> Any:
            return x * scale

        return fn

    x = torch.randn(2)
    assert compute_key(make(2.0), (x,), {}).key == compute_key(make(2.0), (x,), {}).key
    assert compute_key(make(2.0), (x,), {}).key != compute_key(make(3.0), (x,), {}).key
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    b.scale = 3.0  # type: ignore[assignment]
    assert compute_key(a, (x,), {}).components["parameters"] != compute_key(b, (x,), {}).components["parameters"]
    # Submodules of torch's own classes, alike in parameters and attributes, that compute otherwise.
    tanh = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh())
    sigmoid = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sigmoid())
    assert compute_key(tanh, (x,), {}).components["code"] == compute_key(sigmoid, (x,), {}).components["code"]
    assert compute_key(tanh, (x,), {}).key != compute_key(sigmoid, (x,), {}).key
    # A function or a list held by a module: by value (Dynamo guards on them; other values once shared a key whose
    # artifact the reader loaded and then sent every call to torch.compile).
    relu, sigmoid, wide = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    relu.act, sigmoid.act = torch.relu, torch.sigmoid  # type: ignore[assignment]
    relu.sizes, wide.sizes = [1, 2], [1, 4]  # type: ignore[assignment]
    sigmoid.sizes = [1, 2]  # type: ignore[assignment]
    wide.act = torch.relu  # type: ignore[assignment]
    keys = {compute_key(m, (x,), {}).components["parameters"] for m in (relu, sigmoid, wide)}
    assert len(keys) == 3, keys
    # An object passed as an input: by its attributes (Dynamo guards on what the trace reads of it).
    class Config:
        def __init__(self, k: float) -> None:
            self.k = k

    assert compute_key(torch_function, (x, Config(1.0)), {}).key != compute_key(torch_function, (x, Config(2.0)), {}).key
    assert compute_key(torch_function, (x, Config(1.0)), {}).key == compute_key(torch_function, (x, Config(1.0)), {}).key


@pytest.mark.torch
def test_the_thread_count_is_in_the_key_only_where_the_compiled_code_depends_on_it() -> None:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from castore.torch.aot_key import threads_free
    from castore.torch.precompiled import compute_key

    cpu = torch.randn(2, 3)
    with FakeTensorMode():  # tensors that claim a CUDA device, on a machine without one
        gpu = torch.empty(2, 3, device="cuda")
        weight, bias = torch.empty(3, 3, device="cuda"), torch.empty(3, device="cuda")
    on_gpu = torch.nn.Linear(3, 3, device="meta")
    on_gpu.weight, on_gpu.bias = torch.nn.Parameter(weight), torch.nn.Parameter(bias)
    assert threads_free(torch_function, (gpu,), {}, None) and threads_free(on_gpu, (gpu,), {}, None)
    assert not threads_free(torch_function, (gpu, cpu), {}, None)  # a CPU input: C++ kernels
    assert not threads_free(torch.nn.Linear(3, 3), (gpu,), {}, None)  # CPU parameters
    assert not threads_free(torch_function, (2.0,), {}, None)  # no tensor: nothing says where it runs
    assert threads_free(torch_function, (cpu,), {}, {"cpp.dynamic_threads": True})
    assert threads_free(torch_function, (cpu,), {}, {"cpp.threads": 4})
    before = torch.get_num_threads()
    try:
        keys = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            plain = compute_key(torch_function, (cpu,), {}).key
            keys[n] = (plain, compute_key(torch_function, (cpu,), {}, options={"cpp.dynamic_threads": True}).key)
    finally:
        torch.set_num_threads(before)
    assert keys[1][0] != keys[2][0] and keys[1][1] == keys[2][1], keys
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        tf32 = compute_key(torch_function, (cpu,), {}, options={"cpp.dynamic_threads": True}).key
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    assert tf32 != compute_key(torch_function, (cpu,), {}, options={"cpp.dynamic_threads": True}).key


@pytest.mark.torch
def test_a_mode_is_keyed_as_the_options_it_stands_for_and_cannot_be_given_with_options() -> None:
    import torch
    from torch._inductor import list_mode_options

    import castore.torch
    from castore.torch.precompiled import compute_key, mode_options

    autotune = mode_options("max-autotune-no-cudagraphs")
    assert autotune == dict(list_mode_options("max-autotune-no-cudagraphs")) and autotune
    assert mode_options("default") is None
    x = torch.randn(2)
    assert compute_key(torch_function, (x,), {}, options=autotune).key != compute_key(torch_function, (x,), {}).key
    with pytest.raises(ValueError, match="not both"):
        castore.torch.aot_compile(torch_function, (x,), mode="max-autotune", options={"max_autotune": True})


def test_a_trace_that_asks_to_restart_is_traced_again_and_one_that_never_settles_raises() -> None:
    # With dynamic shapes Dynamo may restart its analysis (a Python float turned into a tensor): torch.compile
    # retries on its own, aot_compile raises it to the caller.
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis

    from castore.torch.precompiled import AOT_RESTARTS, _trace_with_restarts

    calls: list[int] = []

    def settles_on_the_third(inputs: Any) -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TensorifyScalarRestartAnalysis()
        return f"compiled {inputs}"

    assert _trace_with_restarts(settles_on_the_third, "x") == "compiled x" and len(calls) == 3

    def never_settles(inputs: Any) -> str:
        calls.append(1)
        raise TensorifyScalarRestartAnalysis()

    calls.clear()
    with pytest.raises(TensorifyScalarRestartAnalysis):
        _trace_with_restarts(never_settles, "x")
    assert len(calls) == AOT_RESTARTS + 1
