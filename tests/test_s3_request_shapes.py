"""The requests castore's S3 backend sends: signatures, addressing, headers, retries.

Signatures are checked against AWS's published examples and against botocore's signer; the requests
themselves go to the session's SeaweedFS server (which verifies every signature) through a recording,
fault-injecting proxy on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import subprocess
import sys

import pytest

import castore
from castore.backends import sigv4
from castore.backends.s3 import S3Backend, S3Location, backoff_delay, payload_hash
from castore.errors import BackendError, BackendUnavailable, ConfigError
from castore.format import codec as codecs
from castore.format import keys
from castore.store import Store
from castore.testing.faultproxy import FaultProxy, closed_port_endpoint

EXAMPLE = sigv4.Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
EXAMPLE_TIME = datetime.datetime(2013, 5, 24, tzinfo=datetime.timezone.utc)
CHUNK_PATH = re.compile(r"/prefix/castore/v1/chunks/([0-9a-f]{2})/(\1[0-9a-f]{62})$")


# -- SigV4 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path", "query", "headers", "payload", "signature"),
    [  # the worked examples of AWS's "Signature Calculations for the Authorization Header" page
        ("GET", "/test.txt", {}, {"Range": "bytes=0-9"}, sigv4.EMPTY_SHA256,
         "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"),
        ("PUT", "/test$file.text", {}, {"Date": "Fri, 24 May 2013 00:00:00 GMT", "x-amz-storage-class": "REDUCED_REDUNDANCY"},
         hashlib.sha256(b"Welcome to Amazon S3.").hexdigest(), "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"),
        ("GET", "/", {"max-keys": "2", "prefix": "J"}, {}, sigv4.EMPTY_SHA256,
         "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"),
    ],
)  # fmt: skip
def test_signature_matches_aws_documentation(method, path, query, headers, payload, signature) -> None:  # noqa: ANN001
    signed = sigv4.sign(method, "examplebucket.s3.amazonaws.com", path, query, headers, payload, EXAMPLE, "us-east-1", now=EXAMPLE_TIME)
    assert signed["authorization"].endswith("Signature=" + signature)
    assert "Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request" in signed["authorization"]


@pytest.mark.parametrize(
    ("method", "path", "query", "headers", "token"),
    [
        ("GET", "/bucket/castore/v1/manifests/ns/key", {}, {}, None),
        ("PUT", "/bucket/p/castore/v1/manifests/ns/k", {}, {"If-None-Match": "*"}, "session-token/+="),
        ("GET", "/bucket", {"list-type": "2", "prefix": "p/castore v1/", "continuation-token": "a+b/c=="}, {}, None),
        ("HEAD", "/bucket/odd name/ü~é(1)*!", {}, {}, "t"),
    ],
)
def test_signature_matches_botocore(
    method: str, path: str, query: dict, headers: dict, token: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import botocore.auth
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    body = b"payload" if method == "PUT" else b""
    digest = hashlib.sha256(body).hexdigest() if body else sigv4.EMPTY_SHA256
    now = datetime.datetime(2026, 11, 28, 3, 4, 5, tzinfo=datetime.timezone.utc)
    ours = sigv4.sign(method, "127.0.0.1:8333", path, query, headers, digest, sigv4.Credentials("AK", "SECRET", token), "eu-west-1", now=now)
    url = "http://127.0.0.1:8333" + sigv4.quote_path(path) + ("?" + sigv4.canonical_query(query) if query else "")
    request = AWSRequest(method=method, url=url, data=body, headers={**headers, "X-Amz-Content-SHA256": digest})
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: now.replace(tzinfo=None))
    S3SigV4Auth(Credentials("AK", "SECRET", token), "s3", "eu-west-1").add_auth(request)
    assert ours["authorization"] == request.headers["Authorization"]


def test_credentials_never_print_their_secret() -> None:
    text = repr(sigv4.Credentials("AK", "very-secret", "tok"))
    assert "very-secret" not in text and "tok'" not in text


def test_payload_is_hashed_over_http_and_unsigned_over_tls() -> None:
    assert payload_hash("PUT", b"x", tls=False) == hashlib.sha256(b"x").hexdigest()
    assert payload_hash("PUT", b"x", tls=True) == sigv4.UNSIGNED_PAYLOAD
    assert payload_hash("GET", b"", tls=False) == sigv4.EMPTY_SHA256


# -- addressing --------------------------------------------------------------------------------------------
@pytest.fixture
def no_aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SECRET")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.path.join(os.sep, "nonexistent", "castore-aws-config"))


def test_no_endpoint_means_aws_virtual_hosted(no_aws_env) -> None:  # noqa: ANN001
    be = S3Backend("s3://shapes/p?region=eu-west-1")
    assert be.request_url("p/castore/v1/x") == "https://shapes.s3.eu-west-1.amazonaws.com/p/castore/v1/x"
    assert S3Backend("s3://shapes").region == "us-east-1"


def test_dotted_bucket_uses_path_style_on_aws(no_aws_env) -> None:  # noqa: ANN001
    be = S3Backend("s3://my.bucket/p?region=us-west-2")
    assert be.request_url("p/k") == "https://s3.us-west-2.amazonaws.com/my.bucket/p/k"


def test_region_precedence(no_aws_env, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    assert S3Backend("s3://b").region == "ap-south-1"
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    assert S3Backend("s3://b").region == "eu-central-1"
    assert S3Backend("s3://b?region=sa-east-1").region == "sa-east-1"


def test_endpoint_from_url_query_beats_environment(no_aws_env, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    be = S3Backend("s3://shapes/p?endpoint=http://127.0.0.1:9999")
    assert be.request_url("p/k") == "http://127.0.0.1:9999/shapes/p/k"  # path style on custom endpoints
    assert be.location == S3Location("shapes", "p/", "http://127.0.0.1:9999", None)


def test_endpoint_from_environment(no_aws_env, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:8333")
    assert S3Backend("s3://shapes/p").request_url("p/k") == "http://127.0.0.1:8333/shapes/p/k"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8444")
    assert S3Backend("s3://shapes/p").request_url("p/k") == "http://127.0.0.1:8444/shapes/p/k"


@pytest.mark.parametrize("url", ["s3://", "s3:///prefix", "file:///x", "s3://b/p?endpoint=x&bogus=1"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        S3Location.parse(url)


def test_bad_endpoint_is_a_config_error(no_aws_env) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError):
        S3Backend("s3://b?endpoint=ftp://127.0.0.1:21")


def test_timeouts_retries_and_pool_come_from_the_store_options(no_aws_env) -> None:  # noqa: ANN001
    with castore.open_store("s3://b/p?endpoint=http://127.0.0.1:9", cache_size=0, max_attempts=6, connect_timeout=0.5, workers=3) as store:
        be = store.backend
        assert isinstance(be, S3Backend)
        assert (be.max_attempts, be.timeout.connect_timeout, be.max_concurrency) == (6, 0.5, 3)


def test_backoff_is_full_jitter_doubling_and_capped() -> None:
    assert all(0 <= backoff_delay(a, throttled=t) <= 20 for a in (1, 2, 3, 10, 30) for t in (False, True) for _ in range(50))
    assert max(backoff_delay(1) for _ in range(200)) <= 0.1  # a refused connection: retry soon
    assert max(backoff_delay(1, throttled=True) for _ in range(200)) <= 0.5  # SlowDown: back off harder
    assert 0.1 < max(backoff_delay(3) for _ in range(200)) <= 0.4
    assert max(backoff_delay(30, throttled=True) for _ in range(200)) > 10  # capped, not unbounded


def test_an_environment_with_credentials_never_imports_boto(s3_env: dict[str, str], seaweedfs, s3_bucket: str) -> None:  # noqa: ANN001
    """The point of this backend: a torch job's processes open the store without botocore's start-up cost."""
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


# -- against SeaweedFS, through a recording proxy ----------------------------------------------------------
@pytest.fixture
def proxy(seaweedfs):  # noqa: ANN001, ANN201
    with FaultProxy(seaweedfs.endpoint, record=True) as p:
        yield p


@pytest.fixture
def proxied(proxy: FaultProxy, s3_url: str) -> S3Backend:
    bucket = S3Location.parse(s3_url).bucket
    be = S3Backend(f"s3://{bucket}/prefix?endpoint={proxy.endpoint}", max_attempts=3)
    be._sleep = lambda seconds: None  # backoff is tested on its own; these tests count attempts
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
    # every chunk PUT is signed with its body's digest over plain HTTP, and carries no checksum header
    for r in _puts(proxy):
        assert r.headers["x-amz-content-sha256"] == hashlib.sha256(r.body).hexdigest()
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


def test_throttling_is_retried_then_reported(proxied: S3Backend, proxy: FaultProxy) -> None:
    """503 SlowDown is retried with backoff, then a BackendError, never a miss; max_attempts counts every try."""
    slept: list[float] = []
    proxied._sleep = slept.append
    proxied.put("obj", b"payload")
    proxy.reset_counters()
    proxy.fail_next = 2
    assert proxied.get("obj") == b"payload"
    assert (proxy.requests, proxy.faulted, len(slept)) == (3, 2, 2)
    assert slept[0] <= 0.5 and slept[1] <= 1.0  # throttling backs off from 0.5 s, doubling
    proxy.reset_counters()
    proxy.mode = "slowdown"
    with pytest.raises(BackendError, match="SlowDown"):
        proxied.get("obj")
    assert proxy.requests == 3


def test_unreachable_store_is_unavailable_after_its_attempts(no_aws_env) -> None:  # noqa: ANN001
    be = S3Backend(f"s3://b?endpoint={closed_port_endpoint()}", max_attempts=2)
    slept: list[float] = []
    be._sleep = slept.append
    with pytest.raises(BackendUnavailable):
        be.get("x")
    assert len(slept) == 1


def test_a_bucket_in_another_region_is_followed_once(proxied: S3Backend, proxy: FaultProxy) -> None:
    proxied.put("obj", b"here")
    proxy.bucket_region = "eu-north-1"
    proxy.reset_counters()
    assert proxied.get("obj") == b"here"  # 301 naming eu-north-1, then the same request signed for it
    assert proxied.region == "eu-north-1" and proxy.requests == 2
    assert proxied.get("obj") == b"here" and proxy.requests == 3  # remembered


def test_missing_key_is_a_miss_and_a_missing_bucket_an_error(proxied: S3Backend, seaweedfs) -> None:  # noqa: ANN001
    assert proxied.get("nope") is None and proxied.exists("nope") is False
    other = S3Backend(f"s3://castore-absent-{os.urandom(4).hex()}?endpoint={seaweedfs.endpoint}", max_attempts=1)
    with pytest.raises(BackendError):
        other.get("nope")


def test_credentials_from_a_profile_file(s3_url: str, seaweedfs, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    """Without AWS_* keys in the environment, botocore's chain finds them (here in a shared credentials file)."""
    creds = tmp_path / "credentials"
    creds.write_text(f"[ci]\naws_access_key_id = {seaweedfs.access_key}\naws_secret_access_key = {seaweedfs.secret_key}\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_PROFILE", "ci")
    with S3Backend(s3_url) as be:
        assert be.put("from-profile", b"ok") and be.get("from-profile") == b"ok"
    monkeypatch.setenv("AWS_PROFILE", "absent")
    with S3Backend(s3_url, max_attempts=1) as be, pytest.raises(BackendError):
        be.get("from-profile")
