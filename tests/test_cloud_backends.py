"""az:// against Azurite (the Azure Blob emulator) and gs:// URL handling, through the same obstore backend.

gs:// is not run against a server here: the GCS emulators on the reachable registries do not speak the XML API
that object_store uses for writes and listings (docs/S3.md, 'Google Cloud Storage and Azure')."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

import castore
from castore.backends import describe_backend, open_backend
from castore.backends.cloud import CloudBackend
from castore.errors import BackendError, ConfigError
from castore.testing.azurite import Azurite, find_azurite

SECRET = "s3cr3t-Pw"


@pytest.fixture(scope="module")
def azurite() -> Iterator[Azurite]:
    if find_azurite() is None:
        pytest.skip("Azurite is not installed (npm install azurite); az:// is then untested against a server")
    with Azurite() as az:
        yield az


@pytest.fixture
def az_url(azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> str:
    for name, value in azurite.env().items():
        monkeypatch.setenv(name, value)
    return azurite.url(azurite.create_container(f"c{uuid.uuid4().hex[:12]}"), "prefix")


def test_az_backend_semantics(az_url: str) -> None:
    with open_backend(az_url, max_attempts=1) as be:
        assert isinstance(be, CloudBackend)
        assert be.get("a/missing") is None and be.head("a/missing") is None
        assert be.put("a/one", b"1") and be.put("a/two", b"22") and be.put("ab", b"x")
        assert be.put("a/one", b"other", if_absent=True) is False
        assert be.get("a/one") == b"1"
        info = be.head("a/two")
        assert info is not None and info.size == 2 and info.modified is not None
        assert sorted(be.list("a/")) == [("a/one", 1), ("a/two", 2)]
        assert sorted(p for p, _ in be.list("a")) == ["a/one", "a/two", "ab"]
        be.delete("a/one")
        be.delete("a/one")
        assert be.get("a/one") is None


def test_az_store_roundtrip(az_url: str) -> None:
    data = os.urandom(300 << 10)
    with castore.open_store(az_url, cache_size=0) as store:
        assert store.put("ns", "k", data).published
        assert store.get("ns", "k") == data
        assert store.put("ns", "k", b"second writer").published is False


def test_az_missing_container_is_an_error_not_a_miss(azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in azurite.env().items():
        monkeypatch.setenv(name, value)
    with open_backend(azurite.url("absent-container"), max_attempts=1) as be:
        with pytest.raises(BackendError):
            be.get("k")
        with pytest.raises(BackendError):
            be.put("k", b"x")


@pytest.mark.parametrize("url", ["gs://", "gs://b?bogus=1", "gs://b/a//c", "az://c", "az://c?account=a&account=b",
                                 "gs://b?endpoint=http://[::1", "az://c?account=a&anonymous=perhaps"])  # fmt: skip
def test_bad_cloud_urls_are_config_errors(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AZURE_STORAGE_ACCOUNT_NAME", raising=False)
    with pytest.raises(ConfigError):
        open_backend(url)


def test_cloud_urls_describe_endpoint_and_credentials_without_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_BEARER_TOKEN", SECRET)
    gs = describe_backend(f"gs://bucket/p?endpoint=http://u:{SECRET}@127.0.0.1:4443")
    assert gs == {"endpoint": "http://127.0.0.1:4443", "credentials": "environment (GOOGLE_BEARER_TOKEN)"}
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", "c2VjcmV0LWtleQ==")
    az = describe_backend("az://container/p?account=acct")
    assert az == {"endpoint": "https://acct.blob.core.windows.net", "credentials": "environment (AZURE_STORAGE_ACCOUNT_KEY)"}
    be = open_backend(f"gs://bucket/p?endpoint=http://u:{SECRET}@127.0.0.1:4443")
    assert SECRET not in be.url and be.url == "gs://bucket/p?endpoint=http://127.0.0.1:4443"
