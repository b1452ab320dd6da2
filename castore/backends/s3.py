"""s3://bucket/prefix: any S3-compatible object store (AWS, MinIO, SeaweedFS, R2, GCS interop).

Five requests (GetObject, PutObject, HeadObject, DeleteObject, ListObjectsV2), signed with SigV4 (sigv4.py)
and sent over urllib3's connection pool. Not boto3's client: a torch job opens the store in every process, and
boto3's import and client set-up (service model, endpoint rules, event hooks) cost 0.2 s of CPU per process,
time a fresh machine spent competing with its own compile (README, 'Configuration').

- Endpoint: the URL's ``endpoint=`` parameter, else AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL (path-style
  addressing), else AWS itself (virtual-hosted addressing, following a bucket's region when AWS names another).
- Region: the URL's ``region=``, else AWS_REGION, else AWS_DEFAULT_REGION, else the AWS config file, else
  us-east-1.
- Credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, else botocore's provider chain
  (profiles, SSO, web identity, container and instance roles, refreshed as they expire), imported only then.
- Retries: connection errors, timeouts, 5xx and throttling, up to ``max_attempts`` attempts in all, with full
  jitter exponential backoff (see backoff_delay).
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import hashlib
import os
import random
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import urllib3

from castore.backends import sigv4
from castore.backends.base import Backend, ObjectInfo
from castore.errors import BackendError, BackendUnavailable, ConfigError

USER_AGENT = "castore/0.1 (S3 SigV4; urllib3)"
MAX_BACKOFF = 20.0  # seconds, as botocore's standard mode
TRANSIENT_BASE = 0.1  # seconds: first backoff after a connection error or a 5xx
THROTTLED_BASE = 0.5  # seconds: first backoff after 503 SlowDown, 429 or a throttling error code
LIST_PAGE_SIZE = 1000
# The error codes botocore's standard mode retries, beyond any 5xx status: transient ones and throttling.
_THROTTLE_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded", "LimitExceededException",
    "RequestThrottled",
}  # fmt: skip
_RETRY_CODES = _THROTTLE_CODES | {
    "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "InternalError", "ServiceUnavailable",
}  # fmt: skip
_RETRY_STATUS = {429, 500, 502, 503, 504}
_EXISTS = {"PreconditionFailed", "ConditionalRequestConflict"}  # an If-None-Match put that found an object
_CONNECTION_ERRORS = (
    urllib3.exceptions.NewConnectionError,
    urllib3.exceptions.ConnectTimeoutError,
    urllib3.exceptions.ReadTimeoutError,
    urllib3.exceptions.ProtocolError,  # reset or closed mid-request
    urllib3.exceptions.SSLError,
    urllib3.exceptions.ProxyError,
)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str
    endpoint: str | None
    region: str | None

    @classmethod
    def parse(cls, url: str) -> S3Location:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ConfigError(f"not an s3://bucket/prefix URL: {url!r}")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"endpoint", "region"}
        if unknown:
            raise ConfigError(f"unknown s3 URL parameters: {sorted(unknown)}")
        prefix = parts.path.strip("/")
        return cls(parts.netloc, prefix + "/" if prefix else "", query.get("endpoint"), query.get("region"))


@dataclass
class _Response:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    @functools.cached_property
    def code(self) -> str:
        """The S3 error code of the XML body, else the status (HEAD responses have no body)."""
        if self.body:
            try:
                root = ET.fromstring(self.body)
                code = root.findtext("Code") or root.findtext("{*}Code")
                if code:
                    return code
            except ET.ParseError:
                pass
        return str(self.status)

    def describe(self) -> str:
        message = ""
        if self.body:
            try:
                message = ET.fromstring(self.body).findtext("Message") or ""
            except ET.ParseError:
                message = self.body[:200].decode("utf-8", "replace")
        return f"HTTP {self.status} {self.code}" + (f": {message}" if message else "")


class S3RequestError(BackendError):
    def __init__(self, what: str, response: _Response) -> None:
        super().__init__(f"{what}: {response.describe()}")
        self.status = response.status
        self.code = response.code


def _env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


class _CredentialSource:
    """Static credentials from the environment, else botocore's chain (imported on first use only)."""

    def __init__(self) -> None:
        key, secret = _env("AWS_ACCESS_KEY_ID"), _env("AWS_SECRET_ACCESS_KEY")
        self._static = sigv4.Credentials(key, secret, _env("AWS_SESSION_TOKEN")) if key and secret else None
        self._chain: Any = None
        self._session: Any = None

    def botocore_session(self) -> Any:
        if self._session is None:
            import botocore.session

            self._session = botocore.session.get_session()
        return self._session

    def get(self) -> sigv4.Credentials:
        if self._static is not None:
            return self._static
        try:
            if self._chain is None:
                self._chain = self.botocore_session().get_credentials()
            if self._chain is None:
                raise BackendError("no AWS credentials found (environment, config files, SSO, or instance role)")
            frozen = self._chain.get_frozen_credentials()  # refreshes temporary credentials about to expire
        except BackendError:
            raise
        except Exception as exc:  # noqa: BLE001 - botocore's own errors (expired SSO token, unreachable IMDS)
            raise BackendError(f"AWS credentials: {exc}") from exc
        return sigv4.Credentials(frozen.access_key, frozen.secret_key, frozen.token)

    def config_region(self) -> str | None:
        if self._static is not None and not os.path.exists(os.path.expanduser(_env("AWS_CONFIG_FILE") or "~/.aws/config")):
            return None  # no config file to read: skip importing botocore for nothing
        try:
            return self.botocore_session().get_config_variable("region")
        except Exception:  # noqa: BLE001 - a broken config file leaves the default region
            return None


def _ca_certs() -> str | None:
    explicit = _env("AWS_CA_BUNDLE")
    if explicit:
        return explicit
    try:
        import certifi

        return certifi.where()
    except ImportError:
        return None  # the system's trust store


def payload_hash(method: str, body: bytes, *, tls: bool) -> str:
    """x-amz-content-sha256: the body's SHA-256 over plain HTTP; over TLS, which protects the body in transit,
    UNSIGNED-PAYLOAD (as boto3 does), sparing a hash of every chunk castore already verifies by digest."""
    if method != "PUT":
        return sigv4.EMPTY_SHA256
    return sigv4.UNSIGNED_PAYLOAD if tls else hashlib.sha256(body).hexdigest()


def backoff_delay(attempt: int, *, throttled: bool = False) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): full jitter, doubling, capped.

    The base is 0.1 s for connection errors and 5xx, 0.5 s when S3 asks to slow down, as in the AWS SDK for
    Java's standard policy (botocore starts at 1 s for both): a compile waiting on a cache should not sleep
    seconds on a server that refuses connections."""
    base = THROTTLED_BASE if throttled else TRANSIENT_BASE
    return min(MAX_BACKOFF, random.random() * base * (2 ** (attempt - 1)))


class S3Backend(Backend):
    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 2.0,
        read_timeout: float = 10.0,
        max_attempts: int = 4,
        max_concurrency: int = 16,
        list_page_size: int = LIST_PAGE_SIZE,
    ) -> None:
        self.location = loc = S3Location.parse(url)
        self.url = url
        self.bucket = loc.bucket
        self.max_concurrency = max_concurrency
        self.max_attempts = max(1, max_attempts)
        self.list_page_size = list_page_size
        self.timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self._credentials = _CredentialSource()
        endpoint = loc.endpoint or _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        self.region = loc.region or _env("AWS_REGION", "AWS_DEFAULT_REGION") or self._credentials.config_region() or "us-east-1"
        self._custom_endpoint = endpoint is not None
        if endpoint is not None:
            parts = urlsplit(endpoint if "://" in endpoint else "http://" + endpoint)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"bad S3 endpoint {endpoint!r}: expected http(s)://host[:port]")
            self.endpoint = f"{parts.scheme}://{parts.netloc}"
            self._base_path = parts.path.rstrip("/")
        else:
            self._set_aws_endpoint(self.region)
        self._pool = urllib3.PoolManager(
            num_pools=4,
            maxsize=max_concurrency,
            block=False,
            retries=False,
            timeout=self.timeout,
            ca_certs=_ca_certs(),
            headers={"User-Agent": USER_AGENT},
        )
        self._sleep: Callable[[float], None] = time.sleep

    # -- addressing ------------------------------------------------------------------------------------------
    def _set_aws_endpoint(self, region: str) -> None:
        # Virtual-hosted style where the bucket name is a valid host label without dots (TLS wildcard),
        # path style otherwise, as botocore's 'auto' addressing does.
        suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
        if _virtual_hostable(self.bucket):
            self.endpoint, self._base_path = f"https://{self.bucket}.s3.{region}.{suffix}", ""
            self._virtual = True
        else:
            self.endpoint, self._base_path = f"https://s3.{region}.{suffix}", ""
            self._virtual = False

    def _object_path(self, key: str) -> str:
        """The request path of a bucket key (or of the bucket itself for key '')."""
        if not self._custom_endpoint and self._virtual:
            return f"{self._base_path}/{key}"
        return f"{self._base_path}/{self.bucket}/{key}" if key else f"{self._base_path}/{self.bucket}"

    def request_url(self, key: str, query: dict[str, str] | None = None) -> str:
        """The URL a request for ``key`` (a full bucket key, prefix included) goes to."""
        url = self.endpoint + sigv4.quote_path(self._object_path(key))
        return url + ("?" + sigv4.canonical_query(query) if query else "")

    def _key(self, path: str) -> str:
        return self.location.prefix + path

    # -- one request, retried --------------------------------------------------------------------------------
    def _send(self, method: str, key: str, *, query: dict[str, str] | None = None, body: bytes = b"",
              headers: dict[str, str] | None = None) -> _Response:  # fmt: skip
        what = f"{self.url}: {method} {key}"
        query = query or {}
        payload = payload_hash(method, body, tls=self.endpoint.startswith("https:"))
        redirected = False
        attempt = 0
        while True:
            attempt += 1
            host = urlsplit(self.endpoint).netloc
            path = self._object_path(key)
            try:
                signed = sigv4.sign(method, host, path, query, dict(headers or {}), payload, self._credentials.get(), self.region)
                raw = self._pool.request(
                    method,
                    self.request_url(key, query),
                    body=body if method == "PUT" else None,
                    headers=signed,
                    redirect=False,
                    retries=False,
                    preload_content=True,
                )
            except _CONNECTION_ERRORS as exc:
                if attempt < self.max_attempts:
                    self._sleep(backoff_delay(attempt))
                    continue
                raise BackendUnavailable(f"{what}: {exc} ({attempt} attempts)") from exc
            except urllib3.exceptions.HTTPError as exc:
                raise BackendError(f"{what}: {exc}") from exc
            response = _Response(raw.status, {k.lower(): v for k, v in raw.headers.items()}, raw.data or b"")
            if response.status < 300:
                return response
            bucket_region = response.headers.get("x-amz-bucket-region")
            if response.status in (301, 307, 400) and bucket_region and bucket_region != self.region and not redirected:
                # A request signed for the wrong region: AWS answers 301 (or 400) naming the bucket's region.
                redirected = True
                self.region = bucket_region
                if not self._custom_endpoint:
                    self._set_aws_endpoint(bucket_region)
                attempt -= 1
                continue
            code = response.code
            if (response.status in _RETRY_STATUS or code in _RETRY_CODES) and attempt < self.max_attempts:
                throttled = response.status == 429 or code in _THROTTLE_CODES
                self._sleep(backoff_delay(attempt, throttled=throttled))
                continue
            return response

    # -- the Backend interface -------------------------------------------------------------------------------
    def get(self, path: str) -> bytes | None:
        response = self._send("GET", self._key(path))
        if response.status < 300:
            return response.body
        if response.status == 404 and response.code in ("NoSuchKey", "404"):
            return None
        raise S3RequestError(f"{self.url}: GET {path}", response)

    def get_range(self, path: str, start: int, end: int) -> bytes | None:
        if end <= start:
            return b""
        response = self._send("GET", self._key(path), headers={"Range": f"bytes={start}-{end - 1}"})
        if response.status < 300:
            return response.body[: end - start]
        if response.status == 416:
            return b""
        if response.status == 404 and response.code in ("NoSuchKey", "404"):
            return None
        raise S3RequestError(f"{self.url}: GET {path} (range)", response)

    def put(self, path: str, data: bytes, *, if_absent: bool = False) -> bool:
        headers = {"If-None-Match": "*"} if if_absent else {}
        response = self._send("PUT", self._key(path), body=bytes(data), headers=headers)
        if response.status < 300:
            return True
        if if_absent and (response.status in (409, 412) or response.code in _EXISTS):
            return False
        raise S3RequestError(f"{self.url}: PUT {path}", response)

    def exists(self, path: str) -> bool:
        response = self._send("HEAD", self._key(path))
        if response.status < 300:
            return True
        if response.status == 404:
            return False
        raise S3RequestError(f"{self.url}: HEAD {path}", response)

    def head(self, path: str) -> ObjectInfo | None:
        response = self._send("HEAD", self._key(path))
        if response.status == 404:
            return None
        if response.status >= 300:
            raise S3RequestError(f"{self.url}: HEAD {path}", response)
        etag = response.headers.get("etag", "").strip('"')
        modified = response.headers.get("last-modified")
        when = email.utils.parsedate_to_datetime(modified).timestamp() if modified else None
        return ObjectInfo(int(response.headers.get("content-length") or 0), etag if _is_md5(etag) else None, when)

    def delete(self, path: str) -> None:
        response = self._send("DELETE", self._key(path))
        if response.status >= 300 and response.status != 404:
            raise S3RequestError(f"{self.url}: DELETE {path}", response)

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        for path, info in self.scan(prefix):
            yield path, info.size

    def scan(self, prefix: str) -> Iterator[tuple[str, ObjectInfo]]:
        strip = len(self.location.prefix)
        query = {"list-type": "2", "prefix": self._key(prefix), "max-keys": str(self.list_page_size)}
        while True:
            response = self._send("GET", "", query=query)
            if response.status >= 300:
                raise S3RequestError(f"{self.url}: LIST {prefix}", response)
            try:
                root = ET.fromstring(response.body)
            except ET.ParseError as exc:
                raise BackendError(f"{self.url}: LIST {prefix}: unreadable answer: {exc}") from exc
            for item in root:
                if _local(item.tag) == "Contents":
                    fields = {_local(child.tag): child.text or "" for child in item}
                    etag = fields.get("ETag", "").strip('"')
                    yield fields["Key"][strip:], ObjectInfo(
                        int(fields.get("Size") or 0), etag if _is_md5(etag) else None, _iso_seconds(fields.get("LastModified"))
                    )
            fields = {_local(child.tag): child.text or "" for child in root}
            token = fields.get("NextContinuationToken")
            if fields.get("IsTruncated") != "true" or not token:
                return
            query = dict(query, **{"continuation-token": token})

    def close(self) -> None:
        self._pool.clear()


def _is_md5(etag: str) -> bool:
    return len(etag) == 32 and all(c in "0123456789abcdef" for c in etag)


def _iso_seconds(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _virtual_hostable(bucket: str) -> bool:
    if "." in bucket or not 3 <= len(bucket) <= 63 or bucket.lower() != bucket:
        return False
    return bucket[0].isalnum() and bucket[-1].isalnum() and all(c.isalnum() or c == "-" for c in bucket)
