"""A throwaway Azurite (Azure Blob Storage emulator) on 127.0.0.1, for tests of az:// stores.

Azurite comes from the npm registry (``npm install azurite``, Node.js needed); the binary is found as
$CASTORE_AZURITE, ``azurite-blob`` on $PATH, or ``node_modules/.bin/azurite-blob`` in the current directory or
the repository. Containers are created with azure-storage-blob (obstore has no create-container call). ::

    with Azurite() as az:
        az.create_container("c")
        store = castore.open_store(az.url("c", "prefix"))   # with az.env() in os.environ
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

# Azurite's documented development account (public, the same in every installation).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class AzuriteError(RuntimeError):
    """Azurite could not be found or started."""


def find_azurite() -> str | None:
    explicit = os.environ.get("CASTORE_AZURITE")
    if explicit:
        return explicit
    found = shutil.which("azurite-blob")
    if found:
        return found
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = root / "node_modules" / ".bin" / "azurite-blob"
        if candidate.is_file():
            return str(candidate)
    return None


class Azurite:
    def __init__(self, *, start_timeout: float = 30.0) -> None:
        self.start_timeout = start_timeout
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    def start(self) -> Azurite:
        binary = find_azurite()
        if binary is None:
            raise AzuriteError("azurite-blob not found: npm install azurite (or set CASTORE_AZURITE)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._tmp = tempfile.TemporaryDirectory(prefix="castore-azurite-")
        self._proc = subprocess.Popen(
            [binary, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location", self._tmp.name,
             "--silent", "--skipApiVersionCheck", "--loose", "--disableTelemetry"],  # fmt: skip
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise AzuriteError(f"azurite-blob exited with {self._proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise AzuriteError(f"azurite-blob did not listen on 127.0.0.1:{self.port} within {self.start_timeout:.0f}s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_ACCOUNT_KEY": ACCOUNT_KEY}

    def create_container(self, name: str) -> str:
        from azure.storage.blob import BlobServiceClient

        conn = (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
                f"BlobEndpoint={self.endpoint};")  # fmt: skip
        BlobServiceClient.from_connection_string(conn).create_container(name)
        return name

    def url(self, container: str, prefix: str = "") -> str:
        path = f"/{prefix.strip('/')}" if prefix.strip("/") else ""
        return f"az://{container}{path}?account={ACCOUNT}&endpoint={self.endpoint}"
