"""s3://bucket/prefix: any S3-compatible object store through boto3 (AWS, MinIO, SeaweedFS, R2, GCS interop).

Credentials come from the standard AWS chain. The endpoint comes from the URL's ``endpoint=`` query
parameter, else from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (read by botocore itself), else AWS.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import boto3
import botocore.config
import botocore.exceptions

from castore.backends.base import Backend
from castore.errors import BackendError, BackendUnavailable, ConfigError

_MISSING = {"NoSuchKey", "404", "NotFound"}
_EXISTS = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_UNREACHABLE = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
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


class S3Backend(Backend):
    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 2.0,
        read_timeout: float = 10.0,
        max_attempts: int = 4,
        max_concurrency: int = 16,
    ) -> None:
        self.location = loc = S3Location.parse(url)
        self.url = url
        self.max_concurrency = max_concurrency
        endpoint = loc.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        config = botocore.config.Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # 'standard' retries transient errors and throttling (503 SlowDown) with exponential backoff and jitter.
            retries={"mode": "standard", "total_max_attempts": max_attempts},  # attempts in all, first included
            max_pool_connections=max_concurrency,
            s3={"addressing_style": "path"} if endpoint else None,
            # Checksums on every request cost a full extra hash; castore verifies every chunk by SHA-256 itself.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session()
        self._client = session.client("s3", endpoint_url=endpoint, region_name=loc.region or session.region_name or "us-east-1", config=config)
        self.bucket = loc.bucket

    @property
    def client(self):  # noqa: ANN201 - boto3 has no public client type
        return self._client

    def _key(self, path: str) -> str:
        return self.location.prefix + path

    def _fail(self, op: str, path: str, exc: Exception) -> BackendError:
        if isinstance(exc, _UNREACHABLE):
            return BackendUnavailable(f"{self.url}: {op} {path}: {exc}")
        return BackendError(f"{self.url}: {op} {path}: {exc}")

    @staticmethod
    def _code(exc: botocore.exceptions.ClientError) -> str:
        return str(exc.response.get("Error", {}).get("Code", ""))

    def get(self, path: str) -> bytes | None:
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=self._key(path))
            return resp["Body"].read()
        except botocore.exceptions.ClientError as exc:
            if self._code(exc) in _MISSING:
                return None
            raise self._fail("GET", path, exc) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self._fail("GET", path, exc) from exc

    def put(self, path: str, data: bytes, *, if_absent: bool = False) -> bool:
        extra = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(path), Body=data, **extra)
            return True
        except botocore.exceptions.ClientError as exc:
            if if_absent and self._code(exc) in _EXISTS:
                return False
            raise self._fail("PUT", path, exc) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self._fail("PUT", path, exc) from exc

    def exists(self, path: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(path))
            return True
        except botocore.exceptions.ClientError as exc:
            if self._code(exc) in _MISSING:
                return False
            raise self._fail("HEAD", path, exc) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self._fail("HEAD", path, exc) from exc

    def delete(self, path: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(path))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._fail("DELETE", path, exc) from exc

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        strip = len(self.location.prefix)
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix))
            for page in pages:
                for obj in page.get("Contents", []):
                    yield obj["Key"][strip:], int(obj["Size"])
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._fail("LIST", prefix, exc) from exc

    def close(self) -> None:
        self._client.close()
