"""A small HTTP/1.1 proxy on 127.0.0.1 that injects faults in front of an S3 endpoint, for tests and benchmarks.

Faults: a fixed latency added to every *request* (not per connection, so a keep-alive client pays it on each
call, as it would pay a network round trip), answering every request (``mode="slowdown"``) or the next
``fail_next`` requests with ``503 SlowDown`` (an S3 XML error), and answering requests signed for a region other
than ``bucket_region`` with AWS's ``301 PermanentRedirect``. With ``record=True`` it keeps each request's method,
target, headers and body in ``seen`` (tests of request shapes). A store that is *down* needs no proxy: point
the client at :func:`closed_port_endpoint`. ::

    with FaultProxy(sw.endpoint, latency=0.030) as proxy:      # a 30 ms in-region RTT
        store = castore.open_store(f"s3://b?endpoint={proxy.endpoint}")
        ...
        proxy.mode = "slowdown"                                  # from now on every request gets 503

Each client request (request line, headers, Content-Length or chunked body) is read whole, forwarded on its
own upstream connection with the Host header unchanged (SigV4 signs it), and the response is returned with a
Content-Length, so the client's connection pool keeps its connections alive through the proxy. Threads are
bounded (``max_connections``); :meth:`stop` closes every socket and joins every thread.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

MODES = ("pass", "slowdown")
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
}
_MAX_HEADER_BYTES = 64 << 10


def closed_port_endpoint() -> str:
    """``http://127.0.0.1:<port>`` where nothing listens (connections are refused): a store that is down."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # never listened on: the kernel answers connects with RST at once
    return f"http://127.0.0.1:{port}"


class _BadRequest(Exception):
    pass


_MAX_RECORDED = 10_000


@dataclass(frozen=True)
class SeenRequest:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names
    body: bytes


def _signed_region(headers: list[tuple[str, str]]) -> str | None:
    """The region of a SigV4 Authorization header's credential scope."""
    auth = next((v for k, v in headers if k.lower() == "authorization"), "")
    m = re.search(r"Credential=[^/]+/\d{8}/([^/]+)/", auth)
    return m.group(1) if m else None


class FaultProxy:
    """``FaultProxy(upstream, latency=seconds, mode='pass'|'slowdown')``, a context manager.

    ``latency`` and ``mode`` may be changed while it runs. Counters: ``requests`` (every request read from a
    client), ``forwarded`` (sent upstream), ``faulted`` (answered 503 by the proxy), ``connections``.
    """

    def __init__(
        self,
        upstream: str,
        *,
        latency: float = 0.0,
        mode: str = "pass",
        max_connections: int = 64,
        upstream_timeout: float = 60.0,
        idle_timeout: float = 120.0,
        record: bool = False,
    ) -> None:
        parts = urlsplit(upstream if "://" in upstream else "http://" + upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"FaultProxy forwards to plain http:// endpoints only, not {upstream!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.latency = latency
        self.mode = mode
        self.max_connections = max_connections
        self.upstream_timeout = upstream_timeout
        self.idle_timeout = idle_timeout
        self.fail_next = 0
        self.bucket_region: str | None = None
        self.record = record
        self.seen: list[SeenRequest] = []
        self.requests = 0
        self.forwarded = 0
        self.faulted = 0
        self.connections = 0
        self.port = 0
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._clients: dict[socket.socket, threading.Thread] = {}
        self._stopping = threading.Event()

    # -- properties ------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {value!r}")
        self._mode = value

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset_counters(self) -> None:
        with self._lock:
            self.requests = self.forwarded = self.faulted = self.connections = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        listener.settimeout(0.2)  # lets the accept loop notice stop()
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._stopping.clear()
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"faultproxy-{self.port}", daemon=True)
        self._accept_thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
            self._accept_thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            clients = list(self._clients.items())
        for sock, _ in clients:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a handler blocked in recv
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for _, thread in clients:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- serving ---------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                sock.close()  # over the bound: the client sees a reset and retries
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.idle_timeout)
            thread = threading.Thread(target=self._serve, args=(sock,), name=f"faultproxy-{self.port}-conn", daemon=True)
            with self._lock:
                self._clients[sock] = thread
                self.connections += 1
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        reader = sock.makefile("rb")
        try:
            while not self._stopping.is_set():
                try:
                    request = self._read_request(reader, sock)
                except (_BadRequest, OSError, ValueError):
                    return
                if request is None:
                    return  # the client closed the connection
                method, target, version, headers, body = request
                with self._lock:
                    self.requests += 1
                    if self.record and len(self.seen) < _MAX_RECORDED:
                        self.seen.append(SeenRequest(method, target, {k.lower(): v for k, v in headers}, body))
                    fail = self.mode == "slowdown" or self.fail_next > 0
                    if fail:
                        self.fail_next = max(0, self.fail_next - 1)
                        self.faulted += 1
                if self.latency > 0 and self._stopping.wait(self.latency):
                    return
                signed_region = _signed_region(headers)
                if fail:
                    response = self._slowdown(method, target)
                elif self.bucket_region and signed_region and signed_region != self.bucket_region:
                    response = self._error(301, "PermanentRedirect", "The bucket is in another region.", method, target)
                    response[2].append(("x-amz-bucket-region", self.bucket_region))
                else:
                    try:
                        response = self._forward(method, target, headers, body)
                    except (OSError, http.client.HTTPException) as exc:
                        response = self._error(502, "BadGateway", f"upstream failed: {exc}", method, target)
                    with self._lock:
                        self.forwarded += 1
                close = version == "HTTP/1.0" or any(
                    k.lower() == "connection" and v.strip().lower() == "close" for k, v in headers
                )
                sock.sendall(self._encode_response(*response, close=close))
                if close:
                    return
        except OSError:
            return
        finally:
            reader.close()
            try:
                sock.close()
            finally:
                with self._lock:
                    self._clients.pop(sock, None)
                self._slots.release()

    @staticmethod
    def _read_request(reader, sock: socket.socket):  # noqa: ANN001, ANN205
        line = reader.readline(_MAX_HEADER_BYTES)
        if not line:
            return None
        if line in (b"\r\n", b"\n"):  # tolerated stray CRLF between requests
            line = reader.readline(_MAX_HEADER_BYTES)
            if not line:
                return None
        parts = line.decode("latin-1").rstrip("\r\n").split(" ")
        if len(parts) != 3:
            raise _BadRequest(line)
        method, target, version = parts
        headers: list[tuple[str, str]] = []
        size = 0
        while True:
            h = reader.readline(_MAX_HEADER_BYTES)
            size += len(h)
            if not h or size > _MAX_HEADER_BYTES:
                raise _BadRequest("truncated or oversized headers")
            if h in (b"\r\n", b"\n"):
                break
            name, sep, value = h.decode("latin-1").partition(":")
            if not sep:
                raise _BadRequest(h)
            headers.append((name.strip(), value.strip()))
        lower = {k.lower(): v for k, v in headers}
        if lower.get("expect", "").lower() == "100-continue":
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in lower.get("transfer-encoding", "").lower():
            chunks = []
            while True:
                size_line = reader.readline(_MAX_HEADER_BYTES)
                n = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if n == 0:
                    while reader.readline(_MAX_HEADER_BYTES) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(reader.read(n))
                reader.readline(_MAX_HEADER_BYTES)
            body = b"".join(chunks)
        else:
            length = int(lower.get("content-length", "0") or 0)
            body = reader.read(length) if length else b""
            if len(body) != length:
                raise _BadRequest("truncated body")
        return method, target, version, headers, body

    def _forward(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes):  # noqa: ANN202
        conn = http.client.HTTPConnection(*self.upstream, timeout=self.upstream_timeout)
        try:
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    conn.putheader(name, value)  # Host included, unchanged: it is part of the signature
            if body or method in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
            if method != "HEAD":
                out_headers = [(k, v) for k, v in out_headers if k.lower() != "content-length"]
                out_headers.append(("Content-Length", str(len(data))))
            elif not any(k.lower() == "content-length" for k, _ in out_headers):
                out_headers.append(("Content-Length", "0"))
            return resp.status, resp.reason, out_headers, data
        finally:
            conn.close()

    @staticmethod
    def _error(status: int, code: str, message: str, method: str, target: str):  # noqa: ANN205
        reason = {503: "Slow Down", 502: "Bad Gateway", 301: "Moved Permanently"}.get(status, "Error")
        request_id = uuid.uuid4().hex[:16].upper()
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<Resource>{target.split('?', 1)[0]}</Resource><RequestId>{request_id}</RequestId></Error>"
        ).encode()
        headers = [("Content-Type", "application/xml"), ("x-amz-request-id", request_id)]
        if method == "HEAD":  # a HEAD response has no body; its error code travels in the status alone
            body = b""
        headers.append(("Content-Length", str(len(body))))
        return status, reason, headers, body

    def _slowdown(self, method: str, target: str):  # noqa: ANN202
        return self._error(503, "SlowDown", "Please reduce your request rate.", method, target)

    @staticmethod
    def _encode_response(status: int, reason: str, headers: list[tuple[str, str]], body: bytes, *, close: bool) -> bytes:
        lines = [f"HTTP/1.1 {status} {reason}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines.append("Connection: close" if close else "Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


__all__ = ["MODES", "FaultProxy", "SeenRequest", "closed_port_endpoint"]
