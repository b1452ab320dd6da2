"""Backends by URL scheme. Each backend is one module; only the one a URL names is imported."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from castore.backends.base import Backend, ObjectInfo, ReadOnlyBackend, redact
from castore.errors import ConfigError

SCHEMES = ("file", "memory", "s3", "gs", "az")
NETWORK_SCHEMES = ("s3", "gs", "az")


def open_backend(url: str, **options: Any) -> Backend:
    """Open the backend a URL names. ``options`` (timeouts, retries, concurrency) apply to network backends."""
    if not isinstance(url, str):
        raise ConfigError(f"a store URL must be a str, not {type(url).__name__}")
    try:
        scheme = urlsplit(url).scheme if "://" in url else ""
    except ValueError:
        raise ConfigError(f"not a store URL: {redact(url)!r}") from None
    if scheme == "file":
        path = urlsplit(url).path
        if not path:
            raise ConfigError(f"file URL has no path: {url!r}")
        from castore.backends.file import FileBackend

        return FileBackend(path)
    if scheme == "memory":
        from castore.backends.memory import MemoryBackend

        return MemoryBackend(url[len("memory://") :])
    if scheme == "s3":
        from castore.backends.s3 import S3Backend  # obstore is imported only for network URLs

        return S3Backend(url, **options)
    if scheme in ("gs", "az"):
        from castore.backends.cloud import open_cloud_backend

        return open_cloud_backend(url, **options)
    if not scheme and url.startswith(("/", "~", ".")):
        from castore.backends.file import FileBackend

        return FileBackend(os.path.expanduser(url))
    raise ConfigError(f"unsupported store URL {redact(url)!r}: expected one of {', '.join(s + '://' for s in SCHEMES)}")


def describe_backend(url: str) -> dict[str, str] | None:
    """For a network store: the resolved endpoint, region, addressing style and where the credentials come
    from, as the backend would use them (no request sent, never a secret). None for local stores."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme == "s3":
        from castore.backends.s3 import S3Settings

        return S3Settings.resolve(url).describe()
    if scheme in ("gs", "az"):
        from castore.backends.cloud import CloudBackend

        return CloudBackend(url).describe()
    return None


__all__ = ["NETWORK_SCHEMES", "Backend", "ObjectInfo", "ReadOnlyBackend", "describe_backend", "open_backend", "redact"]
