"""The machines of the hot-load benchmark: the environment of each kind of fresh machine, the servers it talks to
(SeaweedFS through castore.testing, a throwaway redis-server), how one measured process is run, and what the
machine is (its probe and slug).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any

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



# -- one measured process -------------------------------------------------------------------------------------
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
    """The last JSON object line of a process's stdout (its result), or None."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None



# -- the machine itself ------------------------------------------------------------------------------------------
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
