"""A forwarding HTTP proxy on 127.0.0.1 that counts what it carries, for tests of HTTP(S)_PROXY handling.

Plain-HTTP requests arrive in absolute form (``GET http://host:port/path HTTP/1.1``) and are forwarded to
their host when it is a loopback address; ``CONNECT host:port`` tunnels are recorded and, for a loopback
target, spliced through (so HTTPS works too). A request for any other host is answered ``502`` without
leaving the machine: tests can send AWS-shaped requests (virtual-hosted buckets, S3 Express hosts) and look
at where they were going. ::

    with ForwardProxy() as proxy:
        os.environ["HTTP_PROXY"] = proxy.url
        ...
        assert proxy.requests == 3 and proxy.hosts == [...]
"""

from __future__ import annotations

import http.client
import ipaddress
import select
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer", "upgrade"}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def _record(self, host: str, target: str) -> None:
        with self.server.lock:
            self.server.owner.requests += 1
            self.server.owner.hosts.append(host)
            self.server.owner.targets.append(f"{self.command} {target}")
            self.server.owner.headers.append({k.lower(): v for k, v in self.headers.items()})

    def _forward(self) -> None:
        parts = urlsplit(self.path)
        if not parts.scheme or not parts.hostname:
            self.send_error(400, "absolute-form request expected")
            return
        self._record(parts.netloc, self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if not _is_loopback(parts.hostname):
            self._reply(502, [("Content-Type", "text/plain")], b"castore test proxy: not forwarding off this machine")
            return
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=60)
        try:
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            conn.putrequest(self.command, path or "/", skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    conn.putheader(name, value)
            if body or self.command in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP | {"content-length", "transfer-encoding"}]
            self._reply(resp.status, headers, data, head=self.command == "HEAD", length=resp.getheader("Content-Length"))
        except OSError as exc:
            self._reply(502, [("Content-Type", "text/plain")], f"upstream failed: {exc}".encode())
        finally:
            conn.close()

    def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes, *, head: bool = False,
               length: str | None = None) -> None:  # fmt: skip
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", length if head and length is not None else str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward  # noqa: N815 - http.server's naming

    def do_CONNECT(self) -> None:  # noqa: N802 - http.server's naming
        host, _, port = self.path.rpartition(":")
        self._record(self.path, self.path)
        if not _is_loopback(host):
            self._reply(502, [], b"")
            self.close_connection = True
            return
        try:
            upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
        except OSError:
            self._reply(502, [], b"")
            self.close_connection = True
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self.close_connection = True
        sockets = [self.connection, upstream]
        try:
            while True:
                readable, _, _ = select.select(sockets, [], [], 30)
                if not readable:
                    return
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    (upstream if s is self.connection else self.connection).sendall(data)
        finally:
            upstream.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: ForwardProxy
    lock: threading.Lock


class ForwardProxy:
    """``with ForwardProxy() as p``: ``p.url`` to put in HTTP_PROXY / HTTPS_PROXY; ``p.requests`` counts every
    request and CONNECT it received, ``p.hosts`` the host of each, ``p.headers`` their headers."""

    def __init__(self) -> None:
        self.requests = 0
        self.hosts: list[str] = []
        self.targets: list[str] = []
        self.headers: list[dict[str, str]] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def reset(self) -> None:
        self.requests = 0
        self.hosts.clear()
        self.targets.clear()
        self.headers.clear()

    def start(self) -> ForwardProxy:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.owner = self
        server.lock = threading.Lock()
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
                                        name="castore-test-proxy")  # fmt: skip
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> ForwardProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["ForwardProxy"]
