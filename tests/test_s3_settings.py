"""How an s3:// (gs://, az://) URL and the AWS environment resolve: endpoint, region, addressing, credential
source, proxies; bad input is a ConfigError and no secret is ever printed. No server needed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import castore
from castore.backends import open_backend
from castore.backends.base import redact
from castore.backends.s3 import S3Backend, S3Location, S3Settings
from castore.cli import main
from castore.config import load_config
from castore.errors import BackendError, CastoreError, ConfigError

SECRET = "pa55-w0rd-Zq"


@pytest.fixture
def aws_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No AWS_* or proxy variable from outside; AWS files in a temp directory (absent until written)."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "CASTORE_")) or name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return tmp_path


def resolve(url: str) -> S3Settings:
    return S3Settings.resolve(url)


# -- addressing, endpoint, region ---------------------------------------------------------------------------
def test_aws_buckets_are_virtual_hosted_unless_dotted(aws_home: Path) -> None:
    s = resolve("s3://shapes/p?region=eu-west-1")
    assert (s.endpoint, s.addressing) == ("https://shapes.s3.eu-west-1.amazonaws.com", "virtual")
    s = resolve("s3://my.bucket/p?region=us-west-2")
    assert (s.endpoint, s.addressing) == ("https://s3.us-west-2.amazonaws.com", "path")
    s = resolve("s3://shapes/p?region=eu-west-1&addressing=path")
    assert (s.endpoint, s.addressing) == ("https://s3.eu-west-1.amazonaws.com", "path")
    assert resolve("s3://b-in-china?region=cn-north-1").endpoint == "https://b-in-china.s3.cn-north-1.amazonaws.com.cn"


def test_custom_endpoints_are_path_style_unless_virtual_is_asked(aws_home: Path) -> None:
    s = resolve("s3://shapes/p?endpoint=http://127.0.0.1:9999")
    assert (s.endpoint, s.addressing) == ("http://127.0.0.1:9999", "path")
    s = resolve("s3://shapes/p?endpoint=https://minio.example:9000&addressing=virtual")
    assert (s.endpoint, s.addressing) == ("https://shapes.minio.example:9000", "virtual")


def test_directory_buckets_go_to_their_s3_express_zone(aws_home: Path) -> None:
    s = resolve("s3://cache--usw2-az1--x-s3/p?region=us-west-2")
    assert s.addressing == "express" and s.endpoint is None


def test_region_precedence(aws_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve("s3://b").region == "us-east-1"
    (aws_home / "aws-config").write_text("[default]\nregion = ca-central-1\n")
    assert (resolve("s3://b").region, resolve("s3://b").region_source) == ("ca-central-1", "AWS config file, profile default")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    assert resolve("s3://b").region == "ap-south-1"
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    assert resolve("s3://b").region == "eu-central-1"
    assert resolve("s3://b?region=sa-east-1").region == "sa-east-1"


def test_endpoint_precedence_url_environment_config_file(aws_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (aws_home / "aws-config").write_text(
        "[profile ci]\nendpoint_url = http://127.0.0.1:7001\n"
        "[profile nested]\nendpoint_url = http://127.0.0.1:7001\ns3 =\n  endpoint_url = http://127.0.0.1:7002\n"
        "  addressing_style = virtual\n"
    )
    monkeypatch.setenv("AWS_PROFILE", "ci")
    assert resolve("s3://b/p").endpoint == "http://127.0.0.1:7001"
    monkeypatch.setenv("AWS_PROFILE", "nested")  # the s3 sub-section wins over the profile's endpoint_url
    s = resolve("s3://b/p")
    assert (s.endpoint, s.addressing) == ("http://b.127.0.0.1:7002", "virtual")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:7003")
    assert resolve("s3://b/p?addressing=path").endpoint == "http://127.0.0.1:7003"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:7004")
    assert resolve("s3://b/p?addressing=path").endpoint == "http://127.0.0.1:7004"
    assert resolve("s3://b/p?endpoint=http://127.0.0.1:7005&addressing=path").endpoint == "http://127.0.0.1:7005"
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert resolve("s3://bb/p?region=eu-west-1").endpoint == "https://bb.s3.eu-west-1.amazonaws.com"


# -- credential sources ------------------------------------------------------------------------------------
def test_credential_source_order(aws_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve("s3://b").credentials.source == "none"
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED")
    assert resolve("s3://b").credentials.source == "instance"
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://127.0.0.1:1/creds")
    assert resolve("s3://b").credentials.source == "container (botocore)"  # obstore needs the token file
    monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", str(aws_home / "token"))
    assert resolve("s3://b").credentials.source == "container"
    (aws_home / "aws-credentials").write_text(f"[default]\naws_access_key_id = AKPROFILE\naws_secret_access_key = {SECRET}\n")
    creds = resolve("s3://b").credentials
    assert creds.source == "profile default" and creds.static == ("AKPROFILE", SECRET, None)
    (aws_home / "aws-config").write_text("[profile sso-dev]\nsso_session = corp\nsso_account_id = 1\nsso_role_name = r\n"
                                         "[profile role]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = default\n")  # fmt: skip
    monkeypatch.setenv("AWS_PROFILE", "sso-dev")
    assert resolve("s3://b").credentials.source == "sso sso-dev (botocore)"
    monkeypatch.setenv("AWS_PROFILE", "role")
    assert resolve("s3://b").credentials.botocore_profile == "role"
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(aws_home / "token"))
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::1:role/r")
    assert resolve("s3://b").credentials.source == "web identity"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    creds = resolve("s3://b").credentials
    assert creds.source == "environment" and SECRET not in repr(creds)
    monkeypatch.setenv("AWS_PROFILE", "absent")
    with pytest.raises(ConfigError, match="absent"):
        resolve("s3://b")


def test_a_broken_aws_config_file_is_a_config_error_without_its_text(aws_home: Path) -> None:
    (aws_home / "aws-credentials").write_text(f"aws_secret_access_key = {SECRET}\n[default\n")
    with pytest.raises(ConfigError) as info:
        resolve("s3://b")
    assert SECRET not in str(info.value)


# -- bad input: a ConfigError, before any request -----------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "s3://", "s3:///prefix", "file:///x", "s3://b/p?endpoint=x&bogus=1", "s3://b?endpoint=http://[::1",
        "s3://b?endpoint=http://[::1]:99999", "s3://b?endpoint=ftp://127.0.0.1:21", "s3://b?endpoint=http://",
        "s3://b?endpoint=http://h:port", "s3://b?endpoint=http://a%20b", "s3://b?addressing=sideways",
        "s3://b?requester_pays=maybe", "s3://b?region=EU%20West", "s3://b?region=a&region=b", "s3://b/a//c",
        "s3://b/a/../c", "s3://user:pw@bucket/p", "s3://b:99/p", "s3://b?sse_kms_key_id=", "s3://b#frag",
        "s3://[::1/p", "s3://b?endpoint=http://h/?q=1",
    ],
)  # fmt: skip
def test_bad_urls_are_config_errors(url: str, aws_home: Path) -> None:
    with pytest.raises(ConfigError):
        S3Backend(url)
    if url.startswith("s3:"):
        with pytest.raises(ConfigError):
            open_backend(url)


@pytest.mark.parametrize("name", ["connect_timeout", "read_timeout", "request_timeout"])
@pytest.mark.parametrize("value", [0, -1, math.nan, math.inf])
def test_timeouts_must_be_positive_and_finite(name: str, value: float, aws_home: Path) -> None:
    with pytest.raises(ConfigError):
        S3Backend("s3://b?endpoint=http://127.0.0.1:9", **{name: value})
    with pytest.raises(ConfigError):
        load_config({"url": "memory://x", name: value})
    with pytest.raises(ConfigError):
        load_config({"url": "memory://x"}, env={f"CASTORE_{name.upper()}": str(value)})


@pytest.mark.parametrize("value", [0, -3, 1.5, True])
def test_max_attempts_must_be_a_positive_integer(value: object, aws_home: Path) -> None:
    with pytest.raises(ConfigError):
        S3Backend("s3://b?endpoint=http://127.0.0.1:9", max_attempts=value)  # type: ignore[arg-type]


def test_timeouts_and_retries_come_from_the_store_options(aws_home: Path) -> None:
    with castore.open_store("s3://b/p?endpoint=http://127.0.0.1:9", cache_size=0, max_attempts=6, workers=3,
                            request_timeout=7) as store:  # fmt: skip
        be = store.backend
        assert isinstance(be, S3Backend)
        assert (be.max_attempts, be.max_concurrency) == (6, 3)
        assert be._store.retry_config["max_retries"] == 5
        assert be._store.client_options["timeout"] == "7s"


# -- secrets -----------------------------------------------------------------------------------------------
def test_a_password_in_the_endpoint_is_never_shown(aws_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SK")
    port = _closed_port()
    url = f"s3://b/p?endpoint=http://admin:{SECRET}@127.0.0.1:{port}"
    be = S3Backend(url, max_attempts=1, connect_timeout=1)
    assert SECRET not in be.url and SECRET not in repr(be.describe()) and SECRET not in repr(be.settings)
    with pytest.raises(BackendError) as info:
        be.get("k")
    assert SECRET not in str(info.value)
    for bad in (f"s3://b?endpoint=http://u:{SECRET}@[::1", f"s3://b?endpoint=ftp://u:{SECRET}@h",
                f"s3://b?endpoint=http%3A%2F%2Fu%3A{SECRET}%40h%3Ax", f"s3://b?bogus=http://u:{SECRET}@h"):  # fmt: skip
        with pytest.raises(ConfigError) as info:
            open_backend(bad)
        assert SECRET not in str(info.value), bad
    config = load_config({"url": url})
    assert SECRET not in repr(config) and SECRET not in str(config.describe())
    result = CliRunner().invoke(main, ["--url", url, "config"], catch_exceptions=False)
    assert result.exit_code == 0 and SECRET not in result.output and "127.0.0.1" in result.output
    result = CliRunner().invoke(main, ["--url", url, "config", "--json"], catch_exceptions=False)
    assert result.exit_code == 0 and SECRET not in result.output


def test_redact_keeps_the_user_and_hides_the_password() -> None:
    assert redact(f"http://me:{SECRET}@h:9/x") == "http://me:***@h:9/x"
    assert redact(f"http://me:p@{SECRET}@h") == "http://me:***@h"  # '@' inside a password
    assert redact("http://me@h") == "http://me@h"


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- castore config ------------------------------------------------------------------------------------------
def test_config_command_shows_the_resolved_store(aws_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (aws_home / "aws-config").write_text("[profile ci]\nregion = eu-west-3\ns3 =\n  endpoint_url = http://127.0.0.1:7010\n")
    (aws_home / "aws-credentials").write_text(f"[ci]\naws_access_key_id = AKCI\naws_secret_access_key = {SECRET}\n")
    monkeypatch.setenv("AWS_PROFILE", "ci")
    monkeypatch.setenv("HTTP_PROXY", f"http://proxyuser:{SECRET}@127.0.0.1:3128")
    monkeypatch.setenv("NO_PROXY", "localhost")
    result = CliRunner().invoke(main, ["--url", "s3://bucket/p?requester_pays=1", "config", "--json"], catch_exceptions=False)
    assert result.exit_code == 0 and SECRET not in result.output
    store = json.loads(result.output)["store"]
    assert store["endpoint"] == "http://127.0.0.1:7010 (AWS config file, profile ci, s3 endpoint_url)"
    assert store["region"] == "eu-west-3 (AWS config file, profile ci)"
    assert store["addressing"] == "path" and store["credentials"] == "profile ci" and store["requester_pays"] == "yes"
    assert store["proxy"] == "http://proxyuser:***@127.0.0.1:3128 (HTTP_PROXY), NO_PROXY=localhost"
    text = CliRunner().invoke(main, ["--url", "s3://bucket/p", "config"], catch_exceptions=False).output
    assert "credentials" in text and "profile ci" in text and SECRET not in text
    local = json.loads(CliRunner().invoke(main, ["--url", "memory://x", "config", "--json"]).output)
    assert "store" not in local


# -- fuzzing: any string is a backend or a ConfigError, and a secret never leaks -----------------------------
_url_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)
_pieces = st.sampled_from(["s3://", "gs://", "az://", "b", "bucket", "/", "?", "&", "=", "endpoint=", "region=",
                           "addressing=", "requester_pays=", "sse_kms_key_id=", "http://", "https://", "[::1", "]",
                           ":", "@", "%", "%2F", "%40", "..", "//", "#", "x", "1", "path", "virtual", " ", "\x00"])  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(_url_text, st.lists(_pieces, max_size=14).map("".join)))
def test_fuzzed_store_urls_give_a_backend_or_a_config_error(aws_home: Path, text: str) -> None:
    url = text if text.startswith(("s3://", "gs://", "az://")) else "s3://" + text
    try:
        backend = open_backend(url)
    except ConfigError:
        return
    except CastoreError as exc:  # e.g. a profile that needs botocore: a typed error is fine, never another kind
        assert isinstance(exc, BackendError)
        return
    backend.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(st.characters(codec="ascii", exclude_characters="@/?#%\\ \t\n\r\x0b\x0c"), min_size=6, max_size=20),
       st.lists(_pieces, max_size=6).map("".join))  # fmt: skip
def test_fuzzed_endpoint_passwords_never_leak(aws_home: Path, password: str, tail: str) -> None:
    password = "Pw9~" + password  # never a word of castore's own messages
    url = f"s3://bucket/p?endpoint=http://user:{password}@{tail}"
    try:
        backend = open_backend(url)
    except ConfigError as exc:
        assert password not in str(exc)
        return
    assert password not in backend.url and password not in repr(backend.describe())


def test_import_castore_does_not_import_obstore() -> None:
    code = "import sys, castore, castore.backends; print(sorted(m for m in sys.modules if m.startswith(('obstore', 'boto'))))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
