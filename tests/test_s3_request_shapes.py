"""The requests castore's S3 backend (obstore) sends and how it fails: headers, addressing, retries, proxies,
deadlines, credentials from each source that can run here, fork.

Requests go to the session's SeaweedFS server (which verifies every signature), through a recording,
fault-injecting proxy (FaultProxy) or a forwarding HTTP proxy (ForwardProxy), all on 127.0.0.1. Requests for
AWS-shaped hosts are sent through ForwardProxy, which records them and never forwards off the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

import castore
from castore.backends.s3 import S3Backend, S3Location
from castore.errors import BackendError, BackendUnavailable
from castore.format import codec as codecs
from castore.format import keys
from castore.store import Store
from castore.testing.faultproxy import FaultProxy, closed_port_endpoint
from castore.testing.httpproxy import ForwardProxy

pytestmark = pytest.mark.s3
CHUNK_PATH = re.compile(r"/prefix/castore/v1/chunks/([0-9a-f]{2})/(\1[0-9a-f]{62})$")
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_aws(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    """Credentials that sign (the requests never reach AWS), no AWS files, no endpoint from the environment."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SK")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))


# -- what is sent: through a forwarding proxy that records it ------------------------------------------------
def _try(*ops) -> None:  # noqa: ANN002
    for op in ops:
        try:
            op()
        except BackendError:
            pass  # the proxy answers 502 for hosts off this machine; what was sent is what we look at


def test_sse_kms_requester_pays_and_virtual_hosted_requests(fake_aws, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    with ForwardProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        be = S3Backend("s3://bkt/pre?endpoint=http://s3.test:9000&addressing=virtual&sse_kms_key_id=key-1&requester_pays=1",
                       max_attempts=1)  # fmt: skip
        _try(lambda: be.put("k", b"x"), lambda: be.get("k"), lambda: be.head("k"))
        assert proxy.targets == ["PUT http://bkt.s3.test:9000/pre/k", "GET http://bkt.s3.test:9000/pre/k",
                                 "HEAD http://bkt.s3.test:9000/pre/k"]  # fmt: skip
        put, get, head = proxy.headers
        assert put["x-amz-server-side-encryption"] == "aws:kms"
        assert put["x-amz-server-side-encryption-aws-kms-key-id"] == "key-1"
        assert all(h["x-amz-request-payer"] == "requester" for h in (put, get, head))
        assert all(h["host"] == "bkt.s3.test:9000" for h in (put, get, head))
        assert "x-amz-server-side-encryption" not in get
        proxy.reset()
        plain = S3Backend("s3://bkt/pre?endpoint=http://s3.test:9000", max_attempts=1)
        _try(lambda: plain.put("k", b"x"))
        assert proxy.targets == ["PUT http://s3.test:9000/bkt/pre/k"]  # path style by default on other endpoints
        assert not [h for h in proxy.headers[0] if h.startswith(("x-amz-server-side", "x-amz-request-payer"))]


def test_aws_hosts_virtual_path_and_s3_express(fake_aws, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """Over HTTPS the proxy sees the CONNECT host: the addressing style decides it."""
    with ForwardProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        for url in ("s3://shapes/p?region=eu-west-1", "s3://my.bucket/p?region=eu-west-1",
                    "s3://shapes/p?region=eu-west-1&addressing=path", "s3://cache--usw2-az1--x-s3/p?region=us-west-2"):  # fmt: skip
            _try(lambda url=url: S3Backend(url, max_attempts=1, connect_timeout=2).get("k"))
        assert proxy.hosts == [
            "shapes.s3.eu-west-1.amazonaws.com:443",
            "s3.eu-west-1.amazonaws.com:443",
            "s3.eu-west-1.amazonaws.com:443",
            "cache--usw2-az1--x-s3.s3express-usw2-az1.us-west-2.amazonaws.com:443",  # CreateSession, zonal host
        ]


# -- proxies, against SeaweedFS ----------------------------------------------------------------------------
def test_http_proxy_is_used_and_no_proxy_respected(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with ForwardProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        with S3Backend(s3_url) as be:
            assert be.put("via-proxy", b"1") and be.get("via-proxy") == b"1"
        assert proxy.requests == 2 and all(t.split()[1].startswith("http://127.0.0.1:") for t in proxy.targets)
        proxy.reset()
        monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
        with S3Backend(s3_url) as be:
            assert be.get("via-proxy") == b"1"
        assert proxy.requests == 0
        monkeypatch.delenv("NO_PROXY")
        monkeypatch.delenv("HTTP_PROXY")
        monkeypatch.setenv("http_proxy", proxy.url)  # the lower-case spelling too
        with S3Backend(s3_url) as be:
            assert be.get("via-proxy") == b"1"
        assert proxy.requests == 1


def test_a_dead_proxy_is_unavailable_never_a_silent_bypass(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with S3Backend(s3_url) as be:
        be.put("obj", b"x")
    monkeypatch.setenv("HTTP_PROXY", closed_port_endpoint())
    with S3Backend(s3_url, max_attempts=2) as be:
        start = time.monotonic()
        with pytest.raises(BackendUnavailable):
            be.get("obj")
        assert time.monotonic() - start < 5


# -- deadlines ---------------------------------------------------------------------------------------------
class _Trickle:
    """Answers every request with a 178-byte body, one byte every ``interval`` s: no single read ever waits
    long, so only an overall deadline ends the request."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.stop = threading.Event()
        self.requests = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                self.requests += 1
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 178\r\nContent-Type: application/octet-stream\r\n\r\n")
                for _ in range(178):
                    if self.stop.wait(self.interval):
                        return
                    conn.sendall(b"x")
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def test_a_trickling_server_is_cut_off_by_the_request_deadline(fake_aws) -> None:  # noqa: ANN001
    """178 bytes at 5 bytes/s take 36 s; read_timeout=2 never fires; request_timeout=1.5 ends each attempt."""
    server = _Trickle()
    try:
        be = S3Backend(f"s3://b/p?endpoint={server.endpoint}", read_timeout=2, request_timeout=1.5, max_attempts=2)
        start = time.monotonic()
        with pytest.raises(BackendUnavailable):
            be.get("castore/v1/manifests/ns/k")
        elapsed = time.monotonic() - start
        assert 1.4 <= elapsed < 4.5, elapsed  # within 2 x request_timeout (+ backoff), never 36 s
        assert server.requests <= 2
    finally:
        server.close()


# -- credentials from each source that runs here -----------------------------------------------------------
def _no_env_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)


def test_credentials_from_a_profile_in_the_shared_files(s3_url: str, seaweedfs, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
                                                        tmp_path) -> None:  # noqa: ANN001  # fmt: skip
    creds = tmp_path / "credentials"
    creds.write_text(f"[ci]\naws_access_key_id = {seaweedfs.access_key}\naws_secret_access_key = {seaweedfs.secret_key}\n")
    config = tmp_path / "config"
    config.write_text(f"[profile cfg]\naws_access_key_id = {seaweedfs.access_key}\naws_secret_access_key = {seaweedfs.secret_key}\n")
    _no_env_keys(monkeypatch)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    for profile in ("ci", "cfg"):
        monkeypatch.setenv("AWS_PROFILE", profile)
        with S3Backend(s3_url) as be:
            assert be.settings.credentials.source == f"profile {profile}"
            assert be.put("from-profile", b"ok") and be.get("from-profile") == b"ok"
    creds.write_text(f"[ci]\naws_access_key_id = {seaweedfs.access_key}\naws_secret_access_key = wrong\n")
    monkeypatch.setenv("AWS_PROFILE", "ci")
    with S3Backend(s3_url, max_attempts=1) as be, pytest.raises(BackendError):
        be.get("from-profile")


def test_profile_credentials_never_import_boto(s3_env: dict[str, str], seaweedfs, s3_bucket: str, tmp_path) -> None:  # noqa: ANN001
    creds = tmp_path / "credentials"
    creds.write_text(f"[default]\naws_access_key_id = {seaweedfs.access_key}\naws_secret_access_key = {seaweedfs.secret_key}\n")
    env = {k: v for k, v in s3_env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(creds)
    code = (
        "import sys, castore\n"
        f"with castore.open_store({seaweedfs.url(s3_bucket, 'noboto')!r}, cache_size=0) as s:\n"
        "    s.put('ns', 'k', b'v' * 1000)\n"
        "    assert s.get('ns', 'k') == b'v' * 1000\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore', 's3transfer', 'urllib3')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_credentials_from_a_credential_process_profile_through_botocore(s3_url: str, seaweedfs, tmp_path,  # noqa: ANN001
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A profile castore cannot read alone (here credential_process; SSO and assume-role take the same path)."""
    script = tmp_path / "creds.py"
    script.write_text("import json\nprint(json.dumps({'Version': 1, 'AccessKeyId': %r, 'SecretAccessKey': %r}))\n"
                      % (seaweedfs.access_key, seaweedfs.secret_key))  # fmt: skip
    config = tmp_path / "config"
    config.write_text(f"[profile proc]\ncredential_process = {sys.executable} {script}\n")
    _no_env_keys(monkeypatch)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "proc")
    with S3Backend(s3_url) as be:
        assert be.settings.credentials.source == "profile proc (botocore)"
        assert be.put("from-process", b"ok") and be.get("from-process") == b"ok"


class _CredentialsHandler(BaseHTTPRequestHandler):
    body = b""
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        self.seen.append(self.headers.get("Authorization", ""))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def container_credentials(seaweedfs) -> Iterator[str]:  # noqa: ANN001
    """An ECS/EKS-style container credentials endpoint on 127.0.0.1 that hands out the server's keys."""
    expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    _CredentialsHandler.body = json.dumps({"AccessKeyId": seaweedfs.access_key, "SecretAccessKey": seaweedfs.secret_key,
                                           "Token": "tok", "Expiration": expiry}).encode()  # fmt: skip
    _CredentialsHandler.seen = []
    server = HTTPServer(("127.0.0.1", 0), _CredentialsHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v2/credentials/castore"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("token_file", [True, False], ids=["obstore-eks-pod-identity", "botocore"])
def test_credentials_from_the_container_endpoint(seaweedfs, s3_url: str, container_credentials: str, tmp_path,  # noqa: ANN001
                                                 monkeypatch: pytest.MonkeyPatch, token_file: bool) -> None:  # fmt: skip
    """The keys and session token the endpoint hands out sign the requests. (SeaweedFS then refuses a session
    token it did not issue, so what is checked is what was sent, through a recording proxy.)"""
    _no_env_keys(monkeypatch)
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", container_credentials)
    if token_file:
        token = tmp_path / "token"
        token.write_text("container-auth")
        monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", str(token))
    else:
        monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "container-auth")
    bucket = S3Location.parse(s3_url).bucket
    with FaultProxy(seaweedfs.endpoint, record=True) as recorder:
        with S3Backend(f"s3://{bucket}/p?endpoint={recorder.endpoint}", max_attempts=1) as be:
            assert be.settings.credentials.source == ("container" if token_file else "container (botocore)")
            try:
                be.put("from-container", b"ok")
            except BackendError as exc:
                assert "InvalidAccessKeyId" in str(exc) or "403" in str(exc)
        sent = recorder.seen[0].headers
    assert f"Credential={seaweedfs.access_key}/" in sent["authorization"] and sent["x-amz-security-token"] == "tok"
    assert _CredentialsHandler.seen == ["container-auth"]


# -- the endpoint in the AWS config file -------------------------------------------------------------------
def test_endpoint_from_the_aws_config_file(seaweedfs, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    config = tmp_path / "config"
    config.write_text(f"[profile local]\nregion = us-east-1\ns3 =\n  endpoint_url = {seaweedfs.endpoint}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "local")
    with castore.open_store(f"s3://{s3_bucket}/cfg", cache_size=0) as store:
        assert store.put("ns", "k", b"through the configured endpoint").published
        assert store.get("ns", "k") == b"through the configured endpoint"
        assert store.backend.settings.endpoint == seaweedfs.endpoint


# -- against SeaweedFS, through a recording fault proxy ----------------------------------------------------
@pytest.fixture
def proxy(seaweedfs) -> Iterator[FaultProxy]:  # noqa: ANN001
    with FaultProxy(seaweedfs.endpoint, record=True) as p:
        yield p


@pytest.fixture
def proxied(proxy: FaultProxy, s3_url: str) -> Iterator[S3Backend]:
    bucket = S3Location.parse(s3_url).bucket
    be = S3Backend(f"s3://{bucket}/prefix?endpoint={proxy.endpoint}", max_attempts=3)
    yield be
    be.close()


def _puts(proxy: FaultProxy, suffix: str = "") -> list:
    return [r for r in proxy.seen if r.method == "PUT" and r.target.endswith(suffix)]


def test_if_none_match_only_on_manifests(proxied: S3Backend, proxy: FaultProxy) -> None:
    store = Store(proxied)
    data = bytes(range(256)) * 2000 + b"tail"  # 512 KiB: several chunks
    result = store.put("ns", "key", data)
    assert result.published and result.chunks_total >= 2
    manifest = "/prefix/" + keys.manifest_path("ns", "key")
    assert len(_puts(proxy)) == result.chunks_uploaded + 1
    assert [r.headers.get("if-none-match") for r in _puts(proxy, manifest)] == ["*"]
    assert all("if-none-match" not in r.headers for r in _puts(proxy, "") if not r.target.endswith(manifest))
    for r in _puts(proxy):  # signed with the body's digest, single-part, no checksum header
        assert r.headers["x-amz-content-sha256"] == hashlib.sha256(r.body).hexdigest()
        assert "uploadId" not in r.target
        assert not [h for h in r.headers if h.startswith("x-amz-checksum") or h == "x-amz-sdk-checksum-algorithm"]
    proxy.seen.clear()
    store.put("ns", "key", data + b"more", overwrite=True)  # overwrite publishes unconditionally
    assert [r.headers.get("if-none-match") for r in _puts(proxy, manifest)] == [None]
    proxy.seen.clear()
    assert store.put("ns", "key", b"x" * 100).published is False  # a second writer sends the condition and loses
    assert [r.headers.get("if-none-match") for r in _puts(proxy)] == ["*"]


def test_chunk_object_names_are_their_digests_under_the_prefix(proxied: S3Backend, proxy: FaultProxy) -> None:
    data = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(20000))  # 640 KiB, incompressible
    result = Store(proxied).put("ns", "k", data)
    chunk_puts = [r for r in _puts(proxy) if "/chunks/" in r.target]
    assert len(chunk_puts) == result.chunks_total >= 2
    by_path = {}
    for r in chunk_puts:
        m = CHUNK_PATH.search(r.target)
        assert m, r.target
        ref = next(c for c in result.manifest.chunks if c.digest.hex() == m.group(2))
        by_path[keys.chunk_path(ref.digest)] = codecs.decode_chunk(r.body, ref.digest, ref.size)
    assert b"".join(by_path[keys.chunk_path(c.digest)] for c in result.manifest.chunks) == data
    listed = {k for k, _ in proxied.list("castore/v1/")}
    assert listed == set(by_path) | {keys.manifest_path("ns", "k")}


def test_existing_chunks_are_checked_with_head_and_not_uploaded(proxied: S3Backend, proxy: FaultProxy) -> None:
    store = Store(proxied)
    data = bytes(range(256)) * 1024
    store.put("ns", "a", data)
    proxy.seen.clear()
    second = store.put("ns", "b", data)
    heads = [r for r in proxy.seen if r.method == "HEAD"]
    assert len(heads) == second.chunks_total and second.chunks_uploaded == 0
    assert [r.target for r in _puts(proxy)] == [f"/{proxied.bucket}/prefix/castore/v1/manifests/ns/b"]


def test_head_tells_size_md5_and_time(proxied: S3Backend) -> None:
    proxied.put("obj", b"payload")
    info = proxied.head("obj")
    assert info is not None and info.size == 7 and info.md5 == hashlib.md5(b"payload").hexdigest()
    assert abs(info.modified - time.time()) < 300
    assert proxied.head("absent") is None
    scanned = dict(proxied.scan("ob"))
    assert scanned["obj"].size == 7 and scanned["obj"].modified is not None


def test_prefixes_inside_a_path_segment_list_only_their_matches(proxied: S3Backend) -> None:
    for name in ("a/b1", "a/b2", "a/c", "a/ab", "ab", "b"):
        proxied.put(name, b"x")
    assert sorted(p for p, _ in proxied.list("a/b")) == ["a/b1", "a/b2"]
    assert sorted(p for p, _ in proxied.list("a")) == ["a/ab", "a/b1", "a/b2", "a/c", "ab"]
    assert sorted(p for p, _ in proxied.list("a/")) == ["a/ab", "a/b1", "a/b2", "a/c"]
    assert [p for p, _ in proxied.list("zz")] == []


def test_throttling_is_retried_then_reported(proxied: S3Backend, proxy: FaultProxy) -> None:
    """503 SlowDown is retried with backoff, then a BackendError, never a miss; max_attempts counts every try."""
    proxied.put("obj", b"payload")
    proxy.reset_counters()
    proxy.fail_next = 2
    assert proxied.get("obj") == b"payload"
    assert (proxy.requests, proxy.faulted) == (3, 2)
    proxy.reset_counters()
    proxy.mode = "slowdown"
    start = time.monotonic()
    with pytest.raises(BackendError, match="SlowDown|503"):
        proxied.get("obj")
    assert proxy.requests == 3 and time.monotonic() - start < 5


def test_unreachable_store_is_unavailable_after_its_attempts(fake_aws) -> None:  # noqa: ANN001
    be = S3Backend(f"s3://b?endpoint={closed_port_endpoint()}", max_attempts=2)
    start = time.monotonic()
    with pytest.raises(BackendUnavailable):
        be.get("x")
    assert time.monotonic() - start < 5


def test_missing_key_is_a_miss_and_a_missing_bucket_an_error(proxied: S3Backend, seaweedfs) -> None:  # noqa: ANN001
    assert proxied.get("nope") is None and proxied.exists("nope") is False
    other = S3Backend(f"s3://castore-absent-{os.urandom(4).hex()}?endpoint={seaweedfs.endpoint}", max_attempts=1)
    with pytest.raises(BackendError):
        other.get("nope")


def test_an_environment_with_credentials_never_imports_boto(s3_env: dict[str, str], seaweedfs, s3_bucket: str) -> None:  # noqa: ANN001
    code = (
        "import sys, castore\n"
        f"with castore.open_store({seaweedfs.url(s3_bucket, 'noboto')!r}, cache_size=0) as s:\n"
        "    s.put('ns', 'k', b'v' * 1000)\n"
        "    assert s.get('ns', 'k') == b'v' * 1000\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore', 's3transfer')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=s3_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# -- fork ----------------------------------------------------------------------------------------------------
_FORK_CHILD = """
import os, sys, time, castore
url = sys.argv[1]
parent_store = castore.open_store(url, cache_size=0)
if sys.argv[2] == "used":
    parent_store.put("ns", "parent", b"p")
pid = os.fork()
if pid == 0:
    start = time.monotonic()
    try:
        with castore.open_store(url, cache_size=0) as s:  # what the torch session does in a forked child
            s.put("ns", "child", b"c")
            result = "ok" if s.get("ns", "child") == b"c" else "wrong"
    except castore.BackendUnavailable as exc:
        result = "unavailable"
    print(result, round(time.monotonic() - start, 1), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
assert parent_store.get("ns", "child") in (None, b"c")
parent_store.put("ns", "after", b"a")  # the parent's store keeps working
print("parent ok", flush=True)
"""


@pytest.mark.parametrize(("parent", "expected"), [("unused", "ok"), ("used", "unavailable")])
def test_a_forked_child_works_or_fails_fast(s3_env: dict[str, str], seaweedfs, s3_bucket: str, parent: str,  # noqa: ANN001
                                            expected: str) -> None:  # fmt: skip
    """obstore's runtime does not survive fork: a child forked after the parent's first request gets a typed
    error at once (never a hang); a child forked before it works."""
    url = seaweedfs.url(s3_bucket, f"fork-{parent}")
    done = subprocess.run([sys.executable, "-c", _FORK_CHILD, url, parent], env=s3_env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    child, parent_line = done.stdout.strip().splitlines()
    assert child.split()[0] == expected and float(child.split()[1]) < 5
    assert parent_line == "parent ok"
