"""The requests castore's S3 backend sends, checked against moto (in-process, no network, fast)."""

from __future__ import annotations

import hashlib
import re

import botocore.awsrequest
import pytest
from moto import mock_aws

import castore
from castore.backends.s3 import S3Backend, S3Location
from castore.errors import BackendError, ConfigError
from castore.format import keys
from castore.format import codec as codecs
from castore.store import Store

BUCKET = "shapes"
CHUNK_KEY = re.compile(r"^team/proj/castore/v1/chunks/([0-9a-f]{2})/(\1[0-9a-f]{62})$")


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        yield


def _capture(backend: S3Backend, operation: str) -> list[dict]:
    calls: list[dict] = []
    backend.client.meta.events.register(f"before-call.s3.{operation}", lambda params, **_: calls.append(params))
    return calls


def _backend(url: str = f"s3://{BUCKET}/team/proj") -> S3Backend:
    be = S3Backend(url)
    be.client.create_bucket(Bucket=BUCKET)
    return be


def test_if_none_match_only_on_manifests(aws) -> None:  # noqa: ANN001
    be = _backend()
    puts = _capture(be, "PutObject")
    store = Store(be)
    data = bytes(range(256)) * 2000 + b"tail"  # 512 KiB: several chunks
    result = store.put("ns", "key", data)
    assert result.published and result.chunks_total >= 2
    manifest_key = "team/proj/" + keys.manifest_path("ns", "key")
    assert len(puts) == result.chunks_uploaded + 1
    # before-call sees the serialized request: url_path (bucket in the host name on AWS) and headers
    chunk_puts = [p for p in puts if not p["url_path"].endswith(manifest_key)]
    manifest_puts = [p for p in puts if p["url_path"].endswith(manifest_key)]
    assert len(manifest_puts) == 1
    assert manifest_puts[0]["headers"].get("If-None-Match") == "*"
    assert chunk_puts and all("If-None-Match" not in p["headers"] for p in chunk_puts)
    # overwrite=True publishes unconditionally
    puts.clear()
    store.put("ns", "key", data + b"more", overwrite=True)
    assert [p["headers"].get("If-None-Match") for p in puts if p["url_path"].endswith(manifest_key)] == [None]
    # a second writer without overwrite sends the condition and loses
    puts.clear()
    assert store.put("ns", "key", b"x" * 100).published is False
    assert [p["headers"].get("If-None-Match") for p in puts] == ["*"]


def test_chunk_object_names_are_their_digests_under_the_prefix(aws) -> None:  # noqa: ANN001
    be = _backend()
    captured: list[tuple[str, bytes]] = []
    be.client.meta.events.register(
        "before-parameter-build.s3.PutObject", lambda params, **_: captured.append((params["Key"], bytes(params["Body"])))
    )
    data = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(20000))  # 640 KiB, incompressible
    result = Store(be).put("ns", "k", data)
    chunk_keys = [(k, body) for k, body in captured if "/chunks/" in k]
    assert len(chunk_keys) == result.chunks_total >= 2
    pieces = []
    for key, body in chunk_keys:
        m = CHUNK_KEY.match(key)
        assert m, key
        ref = next(r for r in result.manifest.chunks if r.digest.hex() == m.group(2))
        piece = codecs.decode_chunk(body, ref.digest, ref.size)
        assert hashlib.sha256(piece).hexdigest() == m.group(2)
        pieces.append((key, piece))
    order = [keys.chunk_path(r.digest) for r in result.manifest.chunks]
    assert b"".join(dict((k[len("team/proj/") :], p) for k, p in pieces)[path] for path in order) == data
    listed = {k for k, _ in be.list("castore/v1/")}
    assert listed == {k[len("team/proj/") :] for k, _ in captured}
    assert all(not k.startswith("team/proj/") for k in listed)


def test_existing_chunks_are_checked_with_head_and_not_uploaded(aws) -> None:  # noqa: ANN001
    be = _backend()
    store = Store(be)
    data = bytes(range(256)) * 1024
    store.put("ns", "a", data)
    heads, puts = _capture(be, "HeadObject"), _capture(be, "PutObject")
    second = store.put("ns", "b", data)
    assert len(heads) == second.chunks_total and second.chunks_uploaded == 0
    assert len(puts) == 1 and puts[0]["url_path"].endswith("/manifests/ns/b")


def test_no_prefix_and_no_checksum_headers(aws) -> None:  # noqa: ANN001
    be = _backend(f"s3://{BUCKET}")
    sent: list[botocore.awsrequest.AWSPreparedRequest] = []
    be.client.meta.events.register("before-send.s3.PutObject", lambda request, **_: sent.append(request))
    assert be.put("castore/v1/manifests/ns/k", b"m", if_absent=True)
    assert sent[0].url == f"https://{BUCKET}.s3.amazonaws.com/castore/v1/manifests/ns/k"
    assert sent[0].headers["If-None-Match"] == b"*"
    # castore verifies SHA-256 per chunk itself; no extra CRC pass per request
    assert not [h for h in sent[0].headers if h.lower().startswith("x-amz-checksum") or h.lower() == "x-amz-sdk-checksum-algorithm"]


def test_endpoint_from_url_query_beats_environment(aws, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    be = S3Backend(f"s3://{BUCKET}/p?endpoint=http://127.0.0.1:9999")
    assert be.client.meta.endpoint_url == "http://127.0.0.1:9999"
    assert be.client.meta.config.s3["addressing_style"] == "path"
    assert be.location == S3Location(BUCKET, "p/", "http://127.0.0.1:9999", None)


def test_endpoint_from_environment(aws, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:8333")
    be = S3Backend(f"s3://{BUCKET}/p")
    assert be.client.meta.endpoint_url == "http://127.0.0.1:8333"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8444")
    assert S3Backend(f"s3://{BUCKET}/p").client.meta.endpoint_url == "http://127.0.0.1:8444"


def test_no_endpoint_means_aws(aws) -> None:  # noqa: ANN001
    be = S3Backend(f"s3://{BUCKET}/p?region=eu-west-1")
    assert be.client.meta.region_name == "eu-west-1"
    assert "amazonaws.com" in be.client.meta.endpoint_url


@pytest.mark.parametrize("url", ["s3://", "s3:///prefix", "file:///x", f"s3://{BUCKET}/p?endpoint=x&bogus=1"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        S3Location.parse(url)


def test_retries_timeouts_and_pool_are_configured(aws) -> None:  # noqa: ANN001
    be = S3Backend(f"s3://{BUCKET}/p", connect_timeout=1.5, read_timeout=7, max_attempts=3, max_concurrency=5)
    cfg = be.client.meta.config
    assert cfg.retries["mode"] == "standard"
    assert (cfg.connect_timeout, cfg.read_timeout, cfg.max_pool_connections) == (1.5, 7, 5)
    assert be.max_concurrency == 5
    with castore.open_store(f"s3://{BUCKET}/p", cache_size=0, max_attempts=6, connect_timeout=0.5, workers=3) as store:
        cfg = store.backend.client.meta.config
        assert cfg.retries["mode"] == "standard"
        assert cfg.connect_timeout == 0.5 and cfg.max_pool_connections == 3


def _attempts_header(max_attempts: int) -> bytes:
    be = S3Backend(f"s3://{BUCKET}/p", max_attempts=max_attempts)
    be.client.create_bucket(Bucket=BUCKET)
    sent: list = []
    be.client.meta.events.register("before-send.s3.HeadObject", lambda request, **_: sent.append(request))
    be.exists("x")
    return sent[0].headers["amz-sdk-request"]


def test_max_attempts_counts_every_attempt(aws) -> None:  # noqa: ANN001
    assert _attempts_header(3) == b"attempt=1; max=3"


def test_throttling_is_retried_then_reported(aws, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """503 SlowDown is retried (standard mode) with backoff, then a BackendError, not a miss."""
    import botocore.endpoint

    delays: list[float] = []
    monkeypatch.setattr(botocore.endpoint, "time", _FakeTime(delays))  # standard mode backs off up to 20 s
    be = S3Backend(f"s3://{BUCKET}/p", max_attempts=3)
    be.client.create_bucket(Bucket=BUCKET)
    be.put("obj", b"payload")
    attempts = []

    def slow_down(request, **_):  # noqa: ANN001, ANN202
        attempts.append(request.url)
        if len(attempts) <= failures:
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            return botocore.awsrequest.AWSResponse(request.url, 503, {}, _Raw(body))
        return None

    be.client.meta.events.register("before-send.s3.GetObject", slow_down)
    failures = 2
    assert be.get("obj") == b"payload"
    assert len(attempts) == 3
    assert len(delays) == 2  # it backed off between attempts
    attempts.clear()
    failures = 99
    with pytest.raises(BackendError):
        be.get("obj")
    assert len(attempts) == 3  # max_attempts counts every attempt, the first included


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: object):  # noqa: ANN201
        yield self._body

    def read(self, *_: object) -> bytes:
        body, self._body = self._body, b""
        return body


class _FakeTime:
    def __init__(self, delays: list[float]) -> None:
        self.delays = delays

    def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)

    def __getattr__(self, name: str) -> object:
        import time

        return getattr(time, name)
