"""AWS Signature Version 4 for S3 requests, in the Authorization header.

The algorithm of https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html, for the few
requests castore sends. S3 differs from other services in two ways kept here: the path is encoded once (not
twice), and the payload hash travels in ``x-amz-content-sha256``.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import threading
from dataclasses import dataclass
from urllib.parse import quote

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str | None = None

    def __repr__(self) -> str:  # never print the secret
        return f"Credentials(access_key={self.access_key!r}, secret_key='***', token={'***' if self.token else None})"


def quote_path(path: str) -> str:
    """The canonical URI of an S3 object path: RFC 3986 unreserved characters and '/' kept, the rest %XX."""
    return quote(path, safe="/~")


def canonical_query(params: dict[str, str]) -> str:
    return "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params.items()))


class _KeyCache:
    """The derived signing key changes once a day per region: derive it once, not four HMACs per request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cached: tuple[tuple[str, str, str, str], bytes] | None = None

    def get(self, secret: str, date: str, region: str, service: str) -> bytes:
        ident = (secret, date, region, service)
        cached = self._cached
        if cached is not None and cached[0] == ident:
            return cached[1]
        key = ("AWS4" + secret).encode()
        for part in (date, region, service, "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        with self._lock:
            self._cached = (ident, key)
        return key


_keys = _KeyCache()


def sign(
    method: str,
    host: str,
    path: str,
    query: dict[str, str],
    headers: dict[str, str],
    payload_sha256: str,
    credentials: Credentials,
    region: str,
    *,
    service: str = "s3",
    now: datetime.datetime | None = None,
) -> dict[str, str]:
    """The headers to send: ``headers`` plus Host, X-Amz-Date, X-Amz-Content-Sha256, the session token if any,
    and Authorization. Every header passed in is signed; pass only what the request sends verbatim."""
    moment = now or datetime.datetime.now(datetime.timezone.utc)
    amz_date = moment.strftime("%Y%m%dT%H%M%SZ")
    date = amz_date[:8]
    signed_headers = {k.lower(): " ".join(str(v).split()) for k, v in headers.items()}
    signed_headers["host"] = host
    signed_headers["x-amz-date"] = amz_date
    signed_headers["x-amz-content-sha256"] = payload_sha256
    if credentials.token:
        signed_headers["x-amz-security-token"] = credentials.token
    names = sorted(signed_headers)
    canonical_request = "\n".join(
        [
            method,
            quote_path(path),
            canonical_query(query),
            "".join(f"{name}:{signed_headers[name]}\n" for name in names),
            ";".join(names),
            payload_sha256,
        ]
    )
    scope = f"{date}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()])
    key = _keys.get(credentials.secret_key, date, region, service)
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    signed_headers["authorization"] = (
        f"{ALGORITHM} Credential={credentials.access_key}/{scope}, SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return signed_headers
