"""Hot-load benchmark (issue 4): how long a fresh process takes to its first compiled output, per cache strategy.

Every measurement is a separate ``python -m castore.bench.demo_model`` process with its own directories, run
under a timeout; a failure is recorded, never fatal. Modes:

==================  ========================================================================================
``cold``            no caches anywhere (fresh dirs, castore off); also saves a MegaCache bundle
``warm-local``      PyTorch's own local caches filled by that cold run (same dirs, castore off): the floor
``castore-hot``     fresh machine (all local dirs and castore's local layer empty), bucket populated
``castore-warm``    castore's local layer filled, PyTorch's dirs empty
``castore-hot+rtt`` castore-hot with ``--rtt`` (30 ms) added to every S3 request (FaultProxy on loopback)
``redis-remote``    PyTorch's built-in Redis remote caches (a real redis-server), fresh dirs
``megacache``       ``torch.compiler.load_cache_artifacts`` of the cold run's bundle on fresh dirs (load timed)
==================  ========================================================================================

Populating runs (one castore cold run into the bucket, one Redis cold run) are recorded as ``castore-cold``
and ``redis-cold``. Repeats are interleaved (round r runs every mode once, in an order rotated by
one each round) so that background load on a shared machine, and whatever one process leaves to the next,
hits every mode alike. The benchmark starts SeaweedFS (``weed``) and ``redis-server`` itself
on 127.0.0.1 and installs nothing. ::

    python benchmarks/hot_load.py                      # defaults for this machine (CPU or GPU)
    castore bench --models gpt2:infer,gpt2:train --repeats 5 --dedup
    castore bench --quick --models mlp:infer --out /tmp/b
    castore bench --models my_model.py:make_model:train      # your own model (castore.bench.demo_model)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

MODES = ["cold", "warm-local", "castore-hot", "castore-warm", "castore-hot+rtt", "redis-remote", "megacache"]
QUICK_MODES = ["cold", "warm-local", "castore-hot"]
POPULATE_MODES = {"castore": "castore-cold", "redis": "redis-cold"}
CPU_MODELS = ["transformer:infer", "transformer:train", "cnn:infer", "cnn:train"]
GPU_MODELS = ["gpt2:infer", "gpt2:train", "resnet50:infer", "gpt2-autotune:infer"]
DEDUP_VARIANTS = {  # (layers, batch): one model, two depths and two batch sizes
    "cpu": ("transformer", [(2, 4), (4, 4), (2, 8), (4, 8)]),
    "cuda": ("gpt2", [(6, 4), (12, 4), (6, 8), (12, 8)]),
}
REDIS_FLAGS = ("TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE", "TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE", "TORCHINDUCTOR_AUTOTUNE_REMOTE_CACHE")
BREAKER_MESSAGE = "compiling without the store"  # castore's log line when its circuit breaker opens
NOISE_NOTE = (
    "CPU numbers come from a shared 2-core machine on which other engineers ran CPU-heavy tests at the same time: "
    "absolute seconds are noisy (see min/max); repeats are interleaved across modes so that the load hits all modes alike."
)


# -- environments -------------------------------------------------------------------------------------------
def _is_cache_var(name: str) -> bool:
    return (
        name.startswith("CASTORE_")
        or name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TMPDIR", "TORCH_COMPILE_JOB_ID")
        or (name.startswith("TORCHINDUCTOR_") and ("REMOTE" in name or "REDIS" in name))
        or name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
    )


def clean_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without any cache setting (castore, Inductor, Triton, Redis, TMPDIR)."""
    from castore.torch import AUTOLOAD_DIR

    env = {k: v for k, v in (os.environ if base is None else base).items() if not _is_cache_var(k)}
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != AUTOLOAD_DIR]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    else:
        env.pop("PYTHONPATH", None)
    return env


def machine_dirs(root: str) -> dict[str, str]:
    """A fresh 'machine': its own Inductor, Triton, TMPDIR (precompiled headers) and castore local-layer dirs."""
    dirs = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton", "TMPDIR": "tmp", "CASTORE_CACHE_DIR": "castore-local"}
    out = {}
    for name, sub in dirs.items():
        path = os.path.join(root, sub)
        os.makedirs(path, exist_ok=True)
        out[name] = path
    return out


PHASES = ("infer", "train")


def split_model_spec(spec: str) -> tuple[str, str]:
    """(model, phase) of ``model[:phase]``, where model is a built-in name or your own FILE.py:FUNCTION or
    MODULE:FUNCTION (see castore.bench.demo_model); the phase defaults to infer."""
    model, sep, phase = spec.strip().rpartition(":")
    if sep and phase in PHASES:
        return model, phase
    return spec.strip(), "infer"


def resolve_model_spec(spec: str) -> str:
    """``model:phase`` with the phase spelled out and a FILE.py made absolute (the processes run elsewhere)."""
    from castore.bench.demo_model import factory_file

    model, phase = split_model_spec(spec)
    target = factory_file(model)
    if target is not None:
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise SystemExit(f"--models {spec!r}: no file {path}")
        model = path + model[len(target) :]
    return f"{model}:{phase}"


def model_slug(model: str) -> str:
    """A model (or model:phase) in file and folder names; a FILE.py by its file's stem."""
    parts = [os.path.splitext(os.path.basename(p))[0] if p.endswith(".py") else p for p in model.split(":")]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", ":".join(parts))[:80]


def plain_machine_env(root: str) -> dict[str, str]:
    """A fresh machine under root with PyTorch's own caches only (no castore, no remote cache)."""
    env = clean_env()
    env.update(machine_dirs(root))
    return env


def castore_machine_env(root: str, url: str, namespace: str, aws_env: dict[str, str]) -> dict[str, str]:
    """A fresh machine under root whose torch.compile caches are served from the store at url (a castore job's
    environment, with the server's AWS_* credentials; the endpoint is the URL's own)."""
    from castore.config import load_config
    from castore.torch import job_environment

    dirs = machine_dirs(root)
    env = clean_env()
    env.update({k: v for k, v in aws_env.items() if k != "AWS_ENDPOINT_URL_S3"})
    config = load_config({"url": url, "cache_dir": dirs["CASTORE_CACHE_DIR"]})
    env = job_environment(config, namespace, base=env)
    env.update(dirs)
    return env


# -- servers ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def find_redis_server(explicit: str | None = None) -> str | None:
    for candidate in (explicit, os.environ.get("CASTORE_REDIS_SERVER"), shutil.which("redis-server"), "/usr/bin/redis-server"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


class RedisServer:
    """A throwaway ``redis-server`` on 127.0.0.1 and a free port, no persistence."""

    def __init__(self, binary: str, start_timeout: float = 20.0) -> None:
        self.binary = binary
        self.start_timeout = start_timeout
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = ""

    def start(self) -> RedisServer:
        self._dir = tempfile.mkdtemp(prefix="castore-bench-redis-")
        for _ in range(3):
            self.port = _free_port()
            log = open(os.path.join(self._dir, "redis.log"), "ab")  # noqa: SIM115 - the child keeps it
            self._proc = subprocess.Popen(
                [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no", "--dir", self._dir, "--daemonize", "no"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
            log.close()
            deadline = time.monotonic() + self.start_timeout
            while time.monotonic() < deadline and self._proc.poll() is None:
                if self.ping():
                    return self
                time.sleep(0.1)
            self.stop(keep_dir=True)
        raise RuntimeError(f"redis-server did not start; log in {self._dir}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, keep_dir: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if not keep_dir and self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)


def rotated(modes: list[str], repeat: int) -> list[str]:
    """The order of the modes in one repeat, rotated by one each repeat: a process that runs right after another
    kind (one that wrote its caches, or left the GPU driver busy) is not always the same mode's."""
    if not modes:
        return modes
    k = repeat % len(modes)
    return modes[k:] + modes[:k]


# -- one process ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    model: str
    mode: str  # measured mode, or castore-cold / redis-cold (populating runs), or dedup-<variant>
    repeat: int
    ok: bool = False
    returncode: int | None = None
    wall_seconds: float = 0.0
    error: str | None = None
    result: dict[str, Any] | None = None
    stderr_tail: str = ""
    argv: list[str] = field(default_factory=list)
    breaker: bool = False  # castore said it compiled without the store (circuit breaker opened)
    call: str | None = None  # run_id of the benchmark command that measured it (results pooled by --merge)

    def to_dict(self) -> dict[str, Any]:
        keys = ("model", "mode", "repeat", "ok", "returncode", "wall_seconds", "error", "breaker", "argv", "result", "stderr_tail", "call")
        return {k: getattr(self, k) for k in keys}


def run_process(python: str, args: list[str], env: dict[str, str], timeout: float, cwd: str | None = None) -> tuple[int | None, str, str, float, str | None]:
    """(returncode, stdout, stderr, wall seconds, error) of one demo process; the whole process group dies on timeout."""
    start = time.time()
    try:
        proc = subprocess.Popen(
            [python, "-m", "castore.bench.demo_model", *args], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
    except OSError as exc:
        return None, "", "", 0.0, f"could not start: {exc}"
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        return None, out, err, time.time() - start, f"timeout after {timeout:.0f} s"
    wall = time.time() - start
    # A process that leaves with os._exit (--fast-exit) can leave compile workers behind, still shutting down:
    # they must not run into the next process's measurement.
    _kill_group(proc.pid)
    return proc.returncode, out, err, wall, None


def _kill_group(pgid: int) -> None:
    """SIGKILL to what is left of a demo process's session (its compile workers included)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


# -- the benchmark -------------------------------------------------------------------------------------------
class HotLoadBench:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.python = opts.python or sys.executable
        self.runs: list[Run] = []
        self.started = time.time()
        self.run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.work = tempfile.mkdtemp(prefix="castore-bench-", dir=opts.work_dir)
        self.raw_dir = os.path.join(opts.out, "raw")
        self.sw: Any = None
        self.proxy: Any = None
        self.redis: RedisServer | None = None
        self.bucket = ""
        self.unavailable: dict[str, str] = {}  # mode -> why it could not run at all

    # logging to stderr: stdout ends with the markdown table
    def say(self, msg: str) -> None:
        print(f"[hot_load {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    # -- environments for each kind of process
    def plain_env(self, root: str) -> dict[str, str]:
        return plain_machine_env(root)

    def castore_env(self, root: str, namespace: str, via_proxy: bool = False) -> dict[str, str]:
        endpoint = self.proxy.endpoint if via_proxy else self.sw.endpoint
        return castore_machine_env(root, f"s3://{self.bucket}?endpoint={endpoint}", namespace, self.sw.env())

    def redis_env(self, root: str) -> dict[str, str]:
        env = self.plain_env(root)
        for name in REDIS_FLAGS:
            env[name] = "1"
        assert self.redis is not None
        env["TORCHINDUCTOR_REDIS_HOST"] = "127.0.0.1"
        env["TORCHINDUCTOR_REDIS_PORT"] = str(self.redis.port)
        return env

    # -- one measured process
    def measure(self, model: str, mode: str, repeat: int, args: list[str], env: dict[str, str]) -> Run:
        run = Run(model=model, mode=mode, repeat=repeat, argv=list(args), call=self.run_id)
        if self.opts.deadline and time.time() - self.started > self.opts.deadline:
            run.error = f"{NOT_STARTED} {self.opts.deadline:.0f} s"
            self.say(f"{model} {mode} #{repeat}: {run.error}")
            self.runs.append(run)
            return run
        self.say(f"{model} {mode} #{repeat} ...")
        rc, out, err, wall, error = run_process(self.python, args, env, self.opts.timeout, cwd=self.work)
        run.returncode, run.wall_seconds, run.error = rc, round(wall, 3), error
        run.stderr_tail = err[-4000:] if err else ""
        run.breaker = BREAKER_MESSAGE in (err or "")
        run.result = last_json(out)
        if error is None and rc != 0:
            run.error = f"exit status {rc}"
        elif error is None and run.result is None:
            run.error = "no JSON result on stdout"
        run.ok = run.error is None
        if run.ok:
            self.say(f"  {run.result['seconds_to_first_output']:.2f} s to first output (compile {run.result['seconds_compile']:.2f} s)")
        else:
            self.say(f"  FAILED: {run.error}: {run.stderr_tail[-300:]!r}")
        self.runs.append(run)
        write_raw_run(self.raw_dir, run.to_dict())
        return run

    def failed(self, model: str, mode: str, repeat: int, why: str) -> None:
        self.say(f"{model} {mode} #{repeat}: skipped ({why})")
        self.runs.append(Run(model=model, mode=mode, repeat=repeat, error=why, call=self.run_id))

    # -- servers
    def start_servers(self, modes: list[str], need_s3: bool) -> None:
        if need_s3:
            from castore.testing.faultproxy import FaultProxy
            from castore.testing.seaweedfs import SeaweedFS

            try:
                self.sw = SeaweedFS(weed=self.opts.weed).start()
                self.bucket = self.sw.create_bucket(f"bench-{uuid.uuid4().hex[:12]}")
                self.say(f"SeaweedFS at {self.sw.endpoint}, bucket {self.bucket}")
                if "castore-hot+rtt" in modes:
                    self.proxy = FaultProxy(self.sw.endpoint, latency=self.opts.rtt_ms / 1000.0).start()
                    self.say(f"FaultProxy at {self.proxy.endpoint} (+{self.opts.rtt_ms:g} ms per request)")
            except Exception as exc:  # noqa: BLE001 - recorded, the other modes still run
                self.sw = None
                for m in modes:
                    if m.startswith("castore"):
                        self.unavailable[m] = f"SeaweedFS unavailable: {exc}"
                self.unavailable["dedup"] = f"SeaweedFS unavailable: {exc}"
        if "redis-remote" in modes:
            binary = find_redis_server(self.opts.redis_server)
            probe = subprocess.run([self.python, "-c", "import redis"], capture_output=True, text=True)
            if binary is None:
                self.unavailable["redis-remote"] = "redis-server not found (PATH, --redis-server or $CASTORE_REDIS_SERVER)"
            elif probe.returncode != 0:
                self.unavailable["redis-remote"] = "python package 'redis' missing in the benchmark's interpreter"
            else:
                try:
                    self.redis = RedisServer(binary).start()
                    self.say(f"redis-server {binary} on 127.0.0.1:{self.redis.port}")
                except Exception as exc:  # noqa: BLE001
                    self.unavailable["redis-remote"] = str(exc)

    def stop_servers(self) -> None:
        for name in ("proxy", "sw"):
            obj = getattr(self, name)
            if obj is not None:
                try:
                    obj.stop()
                except Exception:  # noqa: BLE001
                    pass
                setattr(self, name, None)
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    # -- one model
    def bench_model(self, spec: str, modes: list[str]) -> None:
        from castore.bench.demo_model import is_factory

        model, phase = split_model_spec(spec)
        # --fast-exit: the measurement ends at the first output; the GPU machine spent 10 s more per process in
        # teardown (CUDA, compile workers), device time better spent on repeats.
        args = ["--model", model, "--mode", phase, "--device", self.opts.device, "--fast-exit"]
        if is_factory(model):  # your own model: a MODULE:FUNCTION is imported from where the benchmark was started
            args += ["--sys-path", os.getcwd()]
        if self.opts.layers:
            args += ["--layers", str(self.opts.layers)]
        if self.opts.batch:
            args += ["--batch", str(self.opts.batch)]
        label = f"{model}:{phase}"
        root = os.path.join(self.work, model_slug(label))
        namespace = f"bench-{self.run_id}-{model_slug(model)}-{phase}"
        castore_modes = [m for m in modes if m.startswith("castore")]
        populated_dir = None
        if castore_modes and not any(m in self.unavailable for m in castore_modes):
            pop_root = os.path.join(root, "castore-cold")
            pop = self.measure(label, POPULATE_MODES["castore"], 0, args + ["--castore"], self.castore_env(pop_root, namespace))
            populated_dir = os.path.join(pop_root, "castore-local") if pop.ok else None
        if "redis-remote" in modes and "redis-remote" not in self.unavailable:
            self.measure(label, POPULATE_MODES["redis"], 0, args, self.redis_env(os.path.join(root, "redis-cold")))
        local_layer = None  # castore's local layer as a castore-hot run left it: the castore-warm starting point
        for r in range(self.opts.repeats):
            if r < self.opts.cold_repeats:
                cold_root = os.path.join(root, f"cold-{r}")
                bundle = os.path.join(cold_root, "megacache.bin")
                cold = self.measure(label, "cold", r, args + (["--save-megacache", bundle] if "megacache" in modes else []), self.plain_env(cold_root))
            # else: warm-local and megacache start again from the last cold run's caches (--cold-repeats)
            for mode in rotated([m for m in modes if m != "cold"], r):
                if mode in self.unavailable:
                    self.failed(label, mode, r, self.unavailable[mode])
                    continue
                mroot = os.path.join(root, f"{mode}-{r}")
                if mode == "warm-local":
                    if cold.ok:
                        self.measure(label, mode, r, args, self.plain_env(cold_root))
                    else:
                        self.failed(label, mode, r, "its cold run failed")
                elif mode == "castore-hot":
                    run = self.measure(label, mode, r, args + ["--castore"], self.castore_env(mroot, namespace))
                    if run.ok and local_layer is None:
                        local_layer = os.path.join(mroot, "castore-local")
                elif mode == "castore-warm":
                    source = local_layer or populated_dir
                    if source is None:
                        self.failed(label, mode, r, "no filled castore local layer")
                        continue
                    env = self.castore_env(mroot, namespace)
                    shutil.rmtree(env["CASTORE_CACHE_DIR"], ignore_errors=True)
                    shutil.copytree(source, env["CASTORE_CACHE_DIR"])
                    self.measure(label, mode, r, args + ["--castore"], env)
                elif mode == "castore-hot+rtt":
                    self.measure(label, mode, r, args + ["--castore"], self.castore_env(mroot, namespace, via_proxy=True))
                elif mode == "redis-remote":
                    self.measure(label, mode, r, args, self.redis_env(mroot))
                elif mode == "megacache":
                    bundles = [bundle] + [os.path.join(root, f"cold-{i}", "megacache.bin") for i in range(r)]
                    found = next((b for b in bundles if os.path.exists(b) and os.path.getsize(b) > 0), None)
                    if found is None:
                        self.failed(label, mode, r, "no MegaCache bundle (cold run failed or saved nothing)")
                        continue
                    self.measure(label, mode, r, args + ["--load-megacache", found], self.plain_env(mroot))
        if not self.opts.keep_work:
            shutil.rmtree(root, ignore_errors=True)

    # -- dedup
    def dedup(self, device_kind: str) -> dict[str, Any]:
        if self.sw is None:
            return {"error": self.unavailable.get("dedup", "SeaweedFS not started")}
        model, variants = DEDUP_VARIANTS[device_kind]
        namespace = f"dedup-{self.run_id}"
        steps = []
        for layers, batch in variants:
            root = os.path.join(self.work, f"dedup-{layers}-{batch}")
            args = ["--model", model, "--mode", self.opts.dedup_phase, "--device", self.opts.device, "--layers", str(layers), "--batch", str(batch)]
            run = self.measure(f"{model}:{self.opts.dedup_phase}", f"dedup-L{layers}-B{batch}", 0, args + ["--castore"], self.castore_env(root, namespace))
            usage = self.du(namespace)
            steps.append({"layers": layers, "batch": batch, "ok": run.ok, "du_after": usage})
            if not self.opts.keep_work:
                shutil.rmtree(root, ignore_errors=True)
        final = steps[-1]["du_after"] if steps else {}
        prev = 0
        for step in steps:
            logical = (step["du_after"] or {}).get("logical_bytes", prev)
            step["logical_bytes_added"] = logical - prev
            prev = logical
        out: dict[str, Any] = {"model": model, "namespace": namespace, "variants": steps, "du": final}
        if final and final.get("stored_bytes"):
            out["logical_bytes"] = final["logical_bytes"]
            out["stored_bytes"] = final["stored_bytes"]
            out["logical_over_stored"] = round(final["logical_bytes"] / final["stored_bytes"], 3)
        return out

    def du(self, namespace: str) -> dict[str, Any] | None:
        env = clean_env()
        env.update({k: v for k, v in self.sw.env().items() if k != "AWS_ENDPOINT_URL_S3"})
        env["CASTORE_CACHE_DIR"] = os.path.join(self.work, "du-local")
        url = f"s3://{self.bucket}?endpoint={self.sw.endpoint}"
        proc = subprocess.run([self.python, "-m", "castore", "--url", url, "du", namespace, "--json"], env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            self.say(f"castore du failed: {proc.stderr[-500:]}")
            return None
        return json.loads(proc.stdout)


# -- machine --------------------------------------------------------------------------------------------------
_PROBE = r"""
import json, platform, torch
d = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "python": platform.python_version()}
if d["cuda"]:
    d["device_name"] = torch.cuda.get_device_name(); d["device_count"] = torch.cuda.device_count(); d["cuda_version"] = torch.version.cuda
try:
    import triton; d["triton"] = triton.__version__
except Exception:
    pass
print(json.dumps(d))
"""


def probe_machine(python: str) -> dict[str, Any]:
    proc = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    info = last_json(proc.stdout) or {"torch": None, "cuda": False, "probe_error": proc.stderr[-500:]}
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    info.update(cpus=cpus, machine=platform.machine(), platform=platform.platform())
    return info


def machine_slug(info: dict[str, Any], device: str) -> str:
    """gpu-h100, gpu-a100, ... from the GPU's name; cpu-<n>core-<arch> otherwise."""
    if device.startswith("cuda") and info.get("device_name"):
        words = [w for w in re.split(r"[^a-z0-9]+", info["device_name"].lower()) if w and w not in ("nvidia", "tesla", "geforce", "rtx")]
        return "gpu-" + (words[0] if words else "unknown")
    return f"cpu-{info['cpus']}core-{info['machine']}"


# -- summary and reports -------------------------------------------------------------------------------------------
def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def _median_of(runs: list[Run], get: Any) -> float | None:
    vals = []
    for r in runs:
        try:
            v = get(r.result)
        except (KeyError, TypeError, AttributeError):
            continue
        if isinstance(v, (int, float)):
            vals.append(v)
    return statistics.median(vals) if vals else None


def summarize(runs: list[Run], models: list[str], modes: list[str]) -> list[dict[str, Any]]:
    rows = []
    for model in models:
        label = ":".join(split_model_spec(model))
        mine = [r for r in runs if r.model == label]

        def digest_of(ref: str, call: str | None) -> str | None:
            """The output digest of the call's first ok run of mode ref (each call compiled its own caches)."""
            return next((r.result["output_digest"] for r in mine if r.ok and r.mode == ref and r.call == call), None)

        def writer_of(mode: str) -> str | None:
            """The mode whose caches this mode loads: with autotuning, two cold compiles may pick different kernel
            configs (and bf16 results), so a hot start is checked against its own writer."""
            if mode.startswith("castore") and mode != POPULATE_MODES["castore"]:
                return POPULATE_MODES["castore"]
            if mode == "redis-remote":
                return POPULATE_MODES["redis"]
            if mode in ("warm-local", "megacache"):
                return "cold"
            return None

        def all_match(ok: list[Run], ref: str | None) -> bool | None:
            """Every run's digest equals its own call's ref run's; None where there is nothing to compare."""
            pairs = [(r.result.get("output_digest"), digest_of(ref, r.call)) for r in ok] if ref else []
            if not pairs or any(want is None for _, want in pairs):
                return None
            return all(got == want for got, want in pairs)
        by_mode: dict[str, dict[str, Any]] = {}
        for mode in modes + [POPULATE_MODES["castore"], POPULATE_MODES["redis"]]:
            sel = [r for r in mine if r.mode == mode]
            if not sel:
                continue
            ok = [r for r in sel if r.ok]
            row: dict[str, Any] = {
                "model": label,
                "mode": mode,
                "runs": len(sel),
                "ok": len(ok),
                "failed": len(sel) - len(ok),
                "errors": sorted({r.error for r in sel if r.error}),
                "first_output_s": _stats([r.result["seconds_to_first_output"] for r in ok]),
                "compile_s": _stats([r.result["seconds_compile"] for r in ok]),
                "digests_match_cold": all_match(ok, "cold"),
                "digests_match_writer": all_match(ok, writer_of(mode)),
                "fx_hits": _median_of(ok, lambda x: x["fxgraph"].get("fxgraph_cache_hit", 0)),
                "fx_misses": _median_of(ok, lambda x: x["fxgraph"].get("fxgraph_cache_miss", 0)),
                "compiler_runs": _median_of(ok, lambda x: x["compiler_runs"]),
                "triton_compiles": _median_of(ok, lambda x: x["triton_compiles"]),
                "autotune_calls": _median_of(ok, lambda x: x["autotune_calls_total"]),
                "megacache_load_s": _median_of(ok, lambda x: x["megacache_load"]["seconds"]),
                # lookups castore skipped (circuit breaker open after a store error or a get over slow_request)
                "castore_skipped": _median_of(ok, lambda x: sum(c.get("skipped", 0) for c in x["castore"]["caches"].values())),
                "castore_breaker_runs": sum(1 for r in ok if r.breaker or BREAKER_MESSAGE in r.stderr_tail) if mode.startswith("castore") else None,
                "populating_run": mode in POPULATE_MODES.values(),
            }
            by_mode[mode] = row
        for row in by_mode.values():
            row["first_output_paired_over_warm_local"] = _paired_ratio(mine, row["mode"], "warm-local")
            for ref in ("warm-local", "cold"):
                base = by_mode.get(ref)
                for metric in ("first_output_s", "compile_s"):
                    key = f"{metric.removesuffix('_s')}_over_{ref.replace('-', '_')}"
                    if row[metric] and base and base[metric] and base[metric]["median"] > 0:
                        row[key] = round(row[metric]["median"] / base[metric]["median"], 3)
                    else:
                        row[key] = None
        rows.extend(by_mode.values())
    return rows


def _paired_ratio(runs: list[Run], mode: str, ref: str) -> dict[str, float] | None:
    """Median over repeats of mode's time to first output divided by that of ref's process in the same repeat of the
    same call. The processes of one repeat run back to back, so this cancels what the machine drifts between
    repeats and between device calls, which the ratio of medians does not; None without a pair."""
    base = {(r.call, r.repeat): r.result["seconds_to_first_output"] for r in runs if r.ok and r.mode == ref}
    ratios = [
        r.result["seconds_to_first_output"] / base[(r.call, r.repeat)]
        for r in runs
        if r.ok and r.mode == mode and base.get((r.call, r.repeat), 0) > 0
    ]
    return {"median": round(statistics.median(ratios), 3), "n": len(ratios)} if ratios else None


def _fmt_paired(v: dict[str, float] | None) -> str:
    return f"{v['median']:.2f}× ({v['n']:g})" if v else "–"


def _fmt_s(s: dict[str, float] | None) -> str:
    return f"{s['median']:.2f} ({s['min']:.2f}–{s['max']:.2f})" if s else "failed"


def _fmt_x(v: float | None) -> str:
    return f"{v:.2f}×" if v is not None else "–"


def _fmt_n(v: float | None) -> str:
    return "–" if v is None else (f"{v:g}")


def _fmt_breaker(row: dict[str, Any]) -> str:
    if row.get("castore_breaker_runs") is None:
        return "–"
    return f"{_fmt_n(row.get('castore_skipped'))} (breaker in {row['castore_breaker_runs']}/{row['ok']})"


def _process_count(report: dict[str, Any]) -> str:
    """How many processes each mode's medians are over: the repeats of one command, or a range once pooled."""
    if report.get("merged_from"):
        counts = sorted({row["runs"] for row in report["summary"] if not row["populating_run"] and row["mode"] != "cold"})
        if counts and counts[0] != counts[-1]:
            return f"{counts[0]}–{counts[-1]}"
    return str(report["repeats"])


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"### Hot load: {report['machine_slug']} (torch {m.get('torch')}, {m.get('device_name') or str(m.get('cpus')) + ' CPUs'}), "
        f"{_process_count(report)} processes per mode"
        + (
            f", pooled from {len(report['merged_from'])} results (the ok column counts each mode's)"
            if report.get("merged_from")
            else f" ({report['cold_repeats']} cold)" if report.get("cold_repeats", report["repeats"]) != report["repeats"] else ""
        )
        + ", medians (min–max)",
        "",
        "| model | mode | ok | first output s | compile s | ×warm-local | ×cold | paired ×warm-local (pairs) | FX hits | C++ runs | Triton compiles | autotune calls | store skipped |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["summary"]:
        name = row["mode"] + (" (populate)" if row["populating_run"] else "")
        lines.append(
            f"| {row['model']} | {name} | {row['ok']}/{row['runs']} | {_fmt_s(row['first_output_s'])} | {_fmt_s(row['compile_s'])} "
            f"| {_fmt_x(row['first_output_over_warm_local'])} | {_fmt_x(row['first_output_over_cold'])} "
            f"| {_fmt_paired(row.get('first_output_paired_over_warm_local'))} | {_fmt_n(row['fx_hits'])} "
            f"| {_fmt_n(row['compiler_runs'])} | {_fmt_n(row['triton_compiles'])} | {_fmt_n(row['autotune_calls'])} "
            f"| {_fmt_breaker(row)} |"
        )
    dd = report.get("dedup")
    if dd and dd.get("stored_bytes"):
        lines += [
            "",
            f"Dedup ({dd['model']}, {len(dd['variants'])} variants: layers×batch "
            + ", ".join(f"{v['layers']}×{v['batch']}" for v in dd["variants"])
            + f"): logical {dd['logical_bytes']:,} B, stored {dd['stored_bytes']:,} B, logical/stored {dd['logical_over_stored']:.2f}×",
        ]
    elif dd:
        lines += ["", f"Dedup: {dd.get('error', 'no result')}"]
    if report.get("note"):
        lines += ["", f"Note: {report['note']}"]
    lines += [
        "",
        "×warm-local and ×cold: median time to first output of the mode divided by that of warm-local / cold, same run. "
        "Paired ×warm-local: the median, over the repeats where both ran, of the mode's time divided by that of the "
        "warm-local process of the same repeat (run back to back, so the machine's drift between repeats cancels). "
        "FX hits, C++ runs (castore modes), Triton compiles (ptxas runs) and autotune calls (GPU): medians per process. "
        "Store skipped: castore lookups skipped because its circuit breaker was open (a store error, or a get slower than "
        "slow_request), and in how many processes the breaker opened.",
    ]
    return "\n".join(lines)


def chart(report: dict[str, Any], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in report["summary"] if not r["populating_run"]]
    models = list(dict.fromkeys(r["model"] for r in rows))
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    if not models or not modes:
        return None
    width = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(models) * max(1, len(modes) / 3)), 4.5))
    cmap = plt.get_cmap("tab10")
    for i, mode in enumerate(modes):
        xs, ys, lo, hi = [], [], [], []
        for j, model in enumerate(models):
            row = next((r for r in rows if r["model"] == model and r["mode"] == mode), None)
            if row and row["first_output_s"]:
                s = row["first_output_s"]
                xs.append(j + (i - (len(modes) - 1) / 2) * width)
                ys.append(s["median"])
                lo.append(s["median"] - s["min"])
                hi.append(s["max"] - s["median"])
        if xs:
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=mode, color=cmap(i % 10))
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([":".join(os.path.basename(part) for part in m.split(":")) for m in models])  # no folders
    ax.set_ylabel("seconds from process start to first compiled output")
    ax.set_title(f"torch.compile hot load, {report['machine_slug']} (median, min–max over {_process_count(report)} processes)", fontsize=9)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- entry point ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="castore bench", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models",
        help="comma-separated model:phase (phase infer|train), a model being a built-in one or your own, named "
        "FILE.py:FUNCTION or MODULE:FUNCTION (FUNCTION() returns (module, example inputs)); default per device: "
        + ",".join(CPU_MODELS) + " | " + ",".join(GPU_MODELS),
    )
    p.add_argument("--modes", help="comma-separated subset of " + ",".join(MODES) + " (cold and warm-local are always run)")
    p.add_argument("--repeats", type=int, default=3, help="processes per mode and model (default 3)")
    p.add_argument("--cold-repeats", type=int, help="cold processes per model (default: --repeats); the rest of the repeats reuse the last cold run's caches")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--quick", action="store_true", help="one model (inference), 1 repeat, modes " + ",".join(QUICK_MODES))
    p.add_argument("--layers", type=int, help="layers of every built-in model (default: each model's own; tests use 1)")
    p.add_argument("--batch", type=int, help="batch size of every built-in model's example input (default: each model's own)")
    p.add_argument("--dedup", action="store_true", help="also measure dedup: castore du over four variants of one model")
    p.add_argument("--dedup-phase", default="infer", choices=["infer", "train"])
    p.add_argument("--out", help="results directory (default benchmarks/results/<machine slug>/ under the current directory)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per process (default 900)")
    p.add_argument("--rtt-ms", type=float, default=30.0, help="latency added to every S3 request in castore-hot+rtt (default 30)")
    p.add_argument("--redis-server", help="redis-server binary (default: $CASTORE_REDIS_SERVER, then PATH)")
    p.add_argument("--weed", help="SeaweedFS weed binary (default: $CASTORE_WEED, next to python, then PATH)")
    p.add_argument("--python", help="interpreter of the measured processes (default: this one)")
    p.add_argument("--work-dir", help="where the per-process machine dirs go (default: system temp)")
    p.add_argument("--keep-work", action="store_true", help="keep the per-process dirs")
    p.add_argument("--append", action="store_true", help="keep the runs of other models already in OUT/hot_load.json (split a long run into several commands)")
    p.add_argument("--rebuild", metavar="DIR", help="only recompute summary, markdown and chart from DIR/hot_load.json")
    p.add_argument(
        "--merge", metavar="DIR", nargs="+",
        help="pool the runs of several result dirs of one machine into --out (more processes per mode than one "
        "device call has time for); each run keeps the run_id of its call, processes never started are dropped",
    )
    p.add_argument("--deadline", type=float, help="start no process after this many seconds (the report is still written)")
    p.add_argument("--note", help="free text stored in the JSON (default: a noise note on CPU)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.rebuild:
        with open(os.path.join(opts.rebuild, "hot_load.json")) as f:
            report = json.load(f)
        runs = [_run_of(r) for r in report["runs"]]
        report["summary"] = summarize(runs, report["models"], report["modes"])
        if opts.note is not None:
            report["note"] = opts.note
        print(write_report(report, opts.rebuild, say=lambda m: print(m, file=sys.stderr)), flush=True)
        return 0
    if opts.merge:
        if not opts.out:
            raise SystemExit("--merge needs --out")
        report = merge_reports([_read_report(d) for d in opts.merge])
        if opts.note is not None:
            report["note"] = opts.note
        os.makedirs(opts.out, exist_ok=True)
        _write_raw(report["runs"], os.path.join(opts.out, "raw"))
        print(write_report(report, opts.out, say=lambda m: print(m, file=sys.stderr)), flush=True)
        return 0
    python = opts.python or sys.executable
    info = probe_machine(python)
    if opts.device == "auto":
        opts.device = "cuda" if info.get("cuda") else "cpu"
    device_kind = "cuda" if opts.device.startswith("cuda") else "cpu"
    slug = machine_slug(info, opts.device)
    models = [m.strip() for m in opts.models.split(",")] if opts.models else list(GPU_MODELS if device_kind == "cuda" else CPU_MODELS)
    models = [resolve_model_spec(m) for m in models if m and m != "none"]  # none: --dedup (and --append) only
    if opts.quick:
        if not opts.models:
            models = [split_model_spec(models[0])[0] + ":infer"]
        models = models[:1]
        opts.repeats = 1
    opts.cold_repeats = max(1, min(opts.cold_repeats or opts.repeats, opts.repeats))
    modes = [m.strip() for m in opts.modes.split(",")] if opts.modes else list(QUICK_MODES if opts.quick else MODES)
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown modes: {', '.join(sorted(unknown))} (choose from {', '.join(MODES)})")
    modes = [m for m in MODES if m in set(modes) | {"cold", "warm-local"}]
    opts.out = opts.out or os.path.join("benchmarks", "results", slug)
    os.makedirs(opts.out, exist_ok=True)
    raw_dir = os.path.join(opts.out, "raw")
    previous: dict[str, Any] | None = None
    if opts.append and os.path.exists(os.path.join(opts.out, "hot_load.json")):
        with open(os.path.join(opts.out, "hot_load.json")) as f:
            previous = json.load(f)
    elif os.path.isdir(raw_dir):
        shutil.rmtree(raw_dir)
    bench = HotLoadBench(opts)
    started = bench.started
    need_s3 = any(m.startswith("castore") for m in modes) or opts.dedup
    bench.say(f"machine {slug}, device {opts.device}, models {models}, modes {modes}, {opts.repeats} repeats")
    dedup_result = None
    try:
        bench.start_servers(modes, need_s3)
        for model in models:
            bench.bench_model(model, modes)
        if opts.dedup:
            dedup_result = bench.dedup(device_kind)
    finally:
        bench.stop_servers()
        if not opts.keep_work:
            shutil.rmtree(bench.work, ignore_errors=True)
    if previous is not None:  # runs of the other models, from earlier commands
        kept = [r for r in previous.get("runs", []) if r["model"] not in models]
        bench.runs[:0] = [_run_of(r) for r in kept]
        models = [m for m in previous.get("models", []) if m not in models] + models
        modes = [m for m in MODES if m in set(modes) | set(previous.get("modes", []))]
        if dedup_result is None:
            dedup_result = previous.get("dedup")
    note = opts.note if opts.note is not None else (NOISE_NOTE if device_kind == "cpu" else "")
    report: dict[str, Any] = {
        "benchmark": "hot_load",
        "run_id": bench.run_id,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "machine_slug": slug,
        "machine": info,
        "device": opts.device,
        "models": models,
        "modes": modes,
        "repeats": opts.repeats,
        "cold_repeats": opts.cold_repeats,
        "layers": opts.layers,
        "batch": opts.batch,
        "rtt_ms": opts.rtt_ms,
        "timeout_s": opts.timeout,
        "unavailable": bench.unavailable,
        "note": note,
        "summary": summarize(bench.runs, models, modes),
        "dedup": dedup_result,
        "runs": [r.to_dict() | {"stderr_tail": r.stderr_tail[-1500:]} for r in bench.runs],
    }
    print(write_report(report, opts.out, bench.say), flush=True)
    return 0


NOT_STARTED = "not run: past --deadline"


def _read_report(directory: str) -> dict[str, Any]:
    with open(os.path.join(directory, "hot_load.json")) as f:
        return json.load(f)


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report of the runs of several, all from one machine, each run tagged with the run_id of the call that
    measured it. Ratios stay side by side: every call measured its own baselines, interleaved with the castore modes.

    A call's runs keep their repeat numbers, shifted past the earlier calls' of the same model, so the processes of
    one repeat stay paired (the paired ratio). Within a call a mode's runs are numbered from 0 in order (only the
    tail of a call is ever left unstarted), which also recovers the numbers from an earlier merged report."""
    if not reports:
        raise ValueError("nothing to merge")
    slugs = {r["machine_slug"] for r in reports}
    if len(slugs) != 1:
        raise SystemExit(f"refusing to pool runs of different machines: {', '.join(sorted(slugs))}")
    by_call: dict[str, list[dict[str, Any]]] = {}
    for report in reports:
        for run in report["runs"]:
            if not (run.get("error") or "").startswith(NOT_STARTED):
                call = run.get("call") or report["run_id"]
                by_call.setdefault(call, []).append(dict(run, call=call))
    runs: list[dict[str, Any]] = []
    counts: dict[tuple[str, str], int] = {}  # (model, mode) -> runs pooled
    offset: dict[str, int] = {}  # model -> first repeat number free for the next call
    for call_runs in by_call.values():
        rank: dict[tuple[str, str], int] = {}
        ends = dict(offset)
        for run in call_runs:
            key = (run["model"], run["mode"])
            run["repeat"] = offset.get(run["model"], 0) + rank.get(key, 0)
            rank[key] = rank.get(key, 0) + 1
            counts[key] = counts.get(key, 0) + 1
            ends[run["model"]] = max(ends.get(run["model"], 0), run["repeat"] + 1)
            runs.append(run)
        offset = ends
    models = list(dict.fromkeys(m for r in reports for m in r["models"]))
    modes = [m for m in MODES if any(m in r["modes"] for r in reports)]
    calls = list(by_call)
    merged = dict(reports[0])
    merged.update({
        "run_id": "merged-" + uuid.uuid4().hex[:6],
        "merged_from": calls,
        "started": min(r["started"] for r in reports),
        "duration_s": round(sum(r.get("duration_s") or 0 for r in reports), 1),
        "models": models,
        "modes": modes,
        "repeats": max(counts.values(), default=0),
        "cold_repeats": max((n for (_, mode), n in counts.items() if mode == "cold"), default=0),
        "summary": summarize([_run_of(r) for r in runs], models, modes),
        "dedup": next((r["dedup"] for r in reports if r.get("dedup")), None),
        "runs": runs,
    })
    return merged


def _run_of(run: dict[str, Any]) -> Run:
    return Run(**{k: v for k, v in run.items() if k in Run.__dataclass_fields__})


def write_raw_run(raw_dir: str, run: dict[str, Any]) -> None:
    """raw/<model>-<mode>-<repeat>.json: one process, with its longer stderr tail."""
    os.makedirs(raw_dir, exist_ok=True)
    name = model_slug(run["model"]) + re.sub(r"[^A-Za-z0-9_.-]+", "_", f"-{run['mode']}-{run['repeat']}")
    with open(os.path.join(raw_dir, name + ".json"), "w") as f:
        json.dump(run, f, indent=1)


def _write_raw(runs: list[dict[str, Any]], raw_dir: str) -> None:
    if os.path.isdir(raw_dir):
        shutil.rmtree(raw_dir)
    for run in runs:
        write_raw_run(raw_dir, run)


def write_report(report: dict[str, Any], out: str, say: Any) -> str:
    """hot_load.json, hot_load.md and hot_load.png under out; returns the markdown table."""
    json_path = os.path.join(out, "hot_load.json")
    md_path = os.path.join(out, "hot_load.md")
    png_path = os.path.join(out, "hot_load.png")
    table = markdown(report)
    report["files"] = {"json": json_path, "markdown": md_path, "chart": png_path, "raw": os.path.join(out, "raw")}
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    with open(md_path, "w") as f:
        f.write(table + "\n")
    if chart(report, png_path) is None:
        say("matplotlib unavailable: no chart")
    say(f"wrote {json_path}, {md_path}, {png_path}")
    return table


if __name__ == "__main__":
    sys.exit(main())
