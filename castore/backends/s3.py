"""s3://bucket/prefix: any S3-compatible object store (AWS, S3 Express, MinIO, SeaweedFS, R2, GCS interop).

Requests go through obstore (objstore.py): it signs (SigV4), retries, bounds each attempt by a deadline and
honours HTTP(S)_PROXY / NO_PROXY. Importing it and creating a client costs a few ms, against about 0.3 s of
CPU for boto3, which matters because every process of a torch job opens the store.

URL parameters (all optional)::

    s3://bucket/prefix?endpoint=http://host:port&region=eu-west-1&addressing=path
                      &sse_kms_key_id=arn:aws:kms:...&requester_pays=1

- Endpoint: ``endpoint=``, else AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL, else the AWS config file's
  profile (``s3 =`` / ``endpoint_url``, then ``endpoint_url``), else AWS itself.
- Region: ``region=``, else AWS_REGION, else AWS_DEFAULT_REGION, else the profile's ``region``, else us-east-1.
- Addressing: ``addressing=`` virtual | path | auto, else the profile's ``s3 = addressing_style``, else auto:
  virtual-hosted on AWS for a bucket name that is a valid host label, path style otherwise and on any other
  endpoint. A directory bucket (``name--zone--x-s3``) on AWS goes to its S3 Express zonal endpoint.
- Credentials: aws.resolve_credentials (environment, web identity, profile, container, instance).
- ``sse_kms_key_id=`` writes every object with SSE-KMS under that key (ETags are then not MD5s);
  ``requester_pays=1`` sends ``x-amz-request-payer: requester``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, parse_qs, urlencode, urlsplit

from castore.backends import aws
from castore.backends.base import redact
from castore.backends.objstore import ObstoreBackend, client_options, retry_config
from castore.config import parse_bool
from castore.errors import BackendError, ConfigError

ADDRESSING = ("auto", "virtual", "path")
_PARAMS = ("endpoint", "region", "addressing", "sse_kms_key_id", "requester_pays")
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_HOST = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_REGION = re.compile(r"[a-z0-9-]{1,40}")
_EXPRESS = re.compile(r".+--(?P<zone>[a-z0-9-]+)--x-s3")


def parse_endpoint(text: str) -> str:
    """``http(s)://host[:port][/path]`` with any user:password@ dropped (S3 never uses it), or ConfigError.
    A bare ``host:port`` means http."""
    shown = redact(text)
    try:
        parts = urlsplit(text if "://" in text else "http://" + text)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ConfigError(f"bad S3 endpoint {shown!r}: {redact(str(exc))}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigError(f"bad S3 endpoint {shown!r}: expected http(s)://host[:port]")
    if parts.query or parts.fragment:
        raise ConfigError(f"bad S3 endpoint {shown!r}: no query or fragment allowed")
    if ":" in host:  # IPv6 literal
        netloc = f"[{host}]"
    elif _HOST.fullmatch(host):
        netloc = host
    else:
        raise ConfigError(f"bad S3 endpoint {shown!r}: {host!r} is not a host name")
    if port is not None:
        netloc += f":{port}"
    path = parts.path.rstrip("/")
    if any(c.isspace() for c in path):
        raise ConfigError(f"bad S3 endpoint {shown!r}: white space in the path")
    return f"{parts.scheme}://{netloc}{path}"


def split_store_url(url: str, refusal: str, *, max_fields: int) -> tuple[SplitResult, dict[str, list[str]]]:
    """(the URL's parts, its query parameters), or ConfigError("refusal: URL", password hidden) when the URL or its
    query cannot be parsed (at most max_fields parameters)."""
    try:
        parts = urlsplit(url)
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query), max_num_fields=max_fields)
    except ValueError:
        raise ConfigError(f"{refusal}: {redact(url)!r}") from None
    return parts, query


@dataclass(frozen=True)
class S3Location:
    """What an s3:// URL says, validated. ``endpoint`` is normalised and carries no user:password."""

    bucket: str
    prefix: str  # '' or ending in '/'
    endpoint: str | None = None
    region: str | None = None
    addressing: str | None = None
    sse_kms_key_id: str | None = None
    requester_pays: bool = False

    @classmethod
    def parse(cls, url: str) -> S3Location:
        if not isinstance(url, str):
            raise ConfigError(f"an s3 URL must be a str, not {type(url).__name__}")
        shown = redact(url)
        parts, query = split_store_url(url, "not an s3://bucket/prefix URL", max_fields=20)
        if parts.scheme != "s3" or not parts.netloc or parts.fragment:
            raise ConfigError(f"not an s3://bucket/prefix URL: {shown!r}")
        if not _BUCKET.fullmatch(parts.netloc):
            raise ConfigError(f"not an S3 bucket name: {redact(parts.netloc)!r} in {shown!r}")
        unknown = sorted(set(query) - set(_PARAMS))
        if unknown:
            raise ConfigError(f"unknown s3 URL parameters {[redact(u) for u in unknown]}; known: {list(_PARAMS)}")
        repeated = sorted(k for k, v in query.items() if len(v) > 1)
        if repeated:
            raise ConfigError(f"s3 URL parameters given more than once: {repeated}")
        q = {k: v[0] for k, v in query.items()}
        prefix = parts.path.strip("/")
        segments = prefix.split("/") if prefix else []
        if any(s in ("", ".", "..") for s in segments) or any(ord(c) < 32 or c == "\x7f" for c in prefix):
            raise ConfigError(f"bad prefix {prefix!r} in {shown!r}: empty, '.' or '..' segments or control characters")
        region = q.get("region") or None
        if region is not None and not _REGION.fullmatch(region):
            raise ConfigError(f"bad region {region!r} in {shown!r}")
        addressing = q.get("addressing") or None
        if addressing is not None and addressing not in ADDRESSING:
            raise ConfigError(f"addressing must be one of {ADDRESSING}, not {addressing!r}")
        kms = q.get("sse_kms_key_id")
        if kms is not None and (not kms.strip() or any(c.isspace() for c in kms)):
            raise ConfigError(f"bad sse_kms_key_id {kms!r}")
        try:
            requester_pays = parse_bool(q.get("requester_pays", "0"))
        except ConfigError:
            raise ConfigError(f"requester_pays must be a boolean (1/0, true/false), not {q['requester_pays']!r}") from None
        endpoint = parse_endpoint(q["endpoint"]) if q.get("endpoint") else None
        return cls(parts.netloc, prefix + "/" if prefix else "", endpoint, region, addressing, kms, requester_pays)

    def url(self) -> str:
        """The URL again, normalised, with no secret in it."""
        params = {"endpoint": self.endpoint, "region": self.region, "addressing": self.addressing,
                  "sse_kms_key_id": self.sse_kms_key_id, "requester_pays": "1" if self.requester_pays else None}  # fmt: skip
        query = urlencode({k: v for k, v in params.items() if v}, safe=":/")
        return f"s3://{self.bucket}/{self.prefix.rstrip('/')}".rstrip("/") + (f"?{query}" if query else "")


def _virtual_hostable(bucket: str) -> bool:
    if "." in bucket or not 3 <= len(bucket) <= 63 or bucket.lower() != bucket:
        return False
    return bucket[0].isalnum() and bucket[-1].isalnum() and all(c.isalnum() or c == "-" for c in bucket)


@dataclass(frozen=True)
class S3Settings:
    """Everything resolved for one s3:// store: what the client is built from and what `castore config` shows."""

    location: S3Location
    endpoint: str | None  # None: S3 Express, whose zonal host obstore derives from the bucket name
    endpoint_source: str
    region: str
    region_source: str
    addressing: str  # 'virtual', 'path' or 'express'
    credentials: aws.Credentials
    proxy: str | None
    proxy_source: str | None
    no_proxy: str | None = None

    @classmethod
    def resolve(cls, url: str, env: Mapping[str, str] | None = None) -> S3Settings:
        env = os.environ if env is None else env
        loc = S3Location.parse(url)
        profile = aws.AwsProfile.load(env)
        region, region_source = aws.resolve_region(loc.region, env, profile)
        if not _REGION.fullmatch(region):
            raise ConfigError(f"bad AWS region {region!r} (from {region_source})")
        endpoint, endpoint_source = aws.resolve_endpoint(loc.endpoint, env, profile)
        if endpoint is not None and endpoint_source != "URL":
            try:
                endpoint = parse_endpoint(endpoint)
            except ConfigError as exc:
                raise ConfigError(f"{exc} (from {endpoint_source})") from None
        style = loc.addressing or profile.s3.get("addressing_style") or "auto"
        if style not in ADDRESSING:
            raise ConfigError(f"addressing_style {style!r} in the AWS config file: expected one of {ADDRESSING}")
        if endpoint is None:
            suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
            if _EXPRESS.fullmatch(loc.bucket) and style != "path":
                style = "express"
            elif style == "virtual" or (style == "auto" and _virtual_hostable(loc.bucket)):
                style, endpoint = "virtual", f"https://{loc.bucket}.s3.{region}.{suffix}"
            else:
                style, endpoint = "path", f"https://s3.{region}.{suffix}"
        elif style == "virtual":
            scheme, rest = endpoint.split("://", 1)
            endpoint = f"{scheme}://{loc.bucket}.{rest}"
        else:
            style = "path"
        scheme = endpoint.split("://", 1)[0] if endpoint else "https"
        proxy, proxy_source = aws.proxy_for(scheme, env)
        return cls(loc, endpoint, endpoint_source, region, region_source, style, aws.resolve_credentials(env, profile),
                   proxy, proxy_source, env.get("NO_PROXY") or env.get("no_proxy"))  # fmt: skip

    def describe(self) -> dict[str, str]:
        loc = self.location
        out = {
            "endpoint": f"{self.endpoint or 'S3 Express zonal endpoint'} ({self.endpoint_source})",
            "region": f"{self.region} ({self.region_source})",
            "addressing": self.addressing,
            "credentials": self.credentials.source,
        }
        if self.proxy:
            out["proxy"] = f"{redact(self.proxy)} ({self.proxy_source})"
            if self.no_proxy:
                out["proxy"] += f", NO_PROXY={self.no_proxy}"
        if loc.sse_kms_key_id:
            out["encryption"] = f"SSE-KMS key {loc.sse_kms_key_id}"
        if loc.requester_pays:
            out["requester_pays"] = "yes"
        return out


class S3Backend(ObstoreBackend):
    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 2.0,
        read_timeout: float = 10.0,
        request_timeout: float = 30.0,
        max_attempts: int = 4,
        max_concurrency: int = 16,
        list_page_size: int = 1000,
    ) -> None:
        settings = S3Settings.resolve(url)
        options = client_options(connect_timeout=connect_timeout, read_timeout=read_timeout,
                                 request_timeout=request_timeout,
                                 allow_http=bool(settings.endpoint and settings.endpoint.startswith("http:")))  # fmt: skip
        retries = retry_config(max_attempts=max_attempts, request_timeout=request_timeout)
        self.settings = settings
        self.location = loc = settings.location
        self.bucket = loc.bucket
        self.region = settings.region
        self.max_attempts = max_attempts
        store = _make_store(settings, options, retries)
        super().__init__(store, url=loc.url(), prefix=loc.prefix, max_concurrency=max_concurrency,
                         list_page_size=list_page_size, etag_is_md5=loc.sse_kms_key_id is None)  # fmt: skip

    def describe(self) -> dict[str, str]:
        return self.settings.describe()


_NATIVE_CREDENTIAL_SETTINGS = (
    ("web_identity_token_file", "AWS_WEB_IDENTITY_TOKEN_FILE"),
    ("role_arn", "AWS_ROLE_ARN"),
    ("role_session_name", "AWS_ROLE_SESSION_NAME"),
    ("sts_endpoint", "AWS_STS_ENDPOINT"),
    ("container_credentials_full_uri", "AWS_CONTAINER_CREDENTIALS_FULL_URI"),
    ("container_credentials_relative_uri", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"),
    ("container_authorization_token_file", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"),
)


def _make_store(settings: S3Settings, options: dict[str, Any], retries: dict[str, Any]) -> Any:
    from obstore.store import S3Store

    loc = settings.location
    config: dict[str, Any] = {"region": settings.region}
    if settings.addressing == "express":
        config["s3_express"] = True
    else:
        # Both names: obstore lets AWS_ENDPOINT_URL_S3 from the environment win over a plain endpoint.
        config["endpoint"] = config["aws_endpoint_url_s3"] = settings.endpoint
        config["virtual_hosted_style_request"] = settings.addressing == "virtual"
    # Over TLS, which protects the body in transit, sign UNSIGNED-PAYLOAD as boto3 does: no SHA-256 pass over
    # every chunk (castore verifies chunks by digest anyway). Over plain HTTP the body's hash is signed.
    config["unsigned_payload"] = settings.endpoint is None or settings.endpoint.startswith("https:")
    if loc.sse_kms_key_id:
        config["server_side_encryption"] = "aws:kms"
        config["sse_kms_key_id"] = loc.sse_kms_key_id
    if loc.requester_pays:
        config["request_payer"] = True
    creds = settings.credentials
    provider = None
    if creds.static is not None:
        key, secret, token = creds.static
        config["access_key_id"], config["secret_access_key"] = key, secret
        if token:
            config["session_token"] = token
    elif creds.botocore:
        provider = _botocore_provider(creds.botocore_profile)
    else:  # obstore's own providers, given their settings explicitly (it does not read every one of them alone)
        for option, variable in _NATIVE_CREDENTIAL_SETTINGS:
            if os.environ.get(variable):
                config[option] = os.environ[variable]
    try:
        return S3Store(loc.bucket, config=config, client_options=options, retry_config=retries, credential_provider=provider)
    except Exception as exc:  # noqa: BLE001 - obstore's configuration errors
        raise ConfigError(f"{loc.url()}: {redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)}") from None


def _botocore_provider(profile: str | None) -> Any:
    """botocore's provider chain for a profile castore cannot read alone (SSO, assume-role, credential_process):
    boto3 is imported here only."""
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider

        return Boto3CredentialProvider(boto3.Session(profile_name=profile))
    except Exception as exc:  # noqa: BLE001 - botocore's own errors (expired SSO token, missing role)
        raise BackendError(f"AWS credentials of profile {profile!r}: {type(exc).__name__}: {redact(str(exc))}") from None


__all__ = ["ADDRESSING", "S3Backend", "S3Location", "S3Settings", "parse_endpoint"]
