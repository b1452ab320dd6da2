"""castore: a content-addressed store for torch.compile artifacts on S3-compatible object storage.

``import castore`` never imports torch, nor the object store client (obstore) unless an s3://, gs:// or az://
store is opened.
"""

from __future__ import annotations

from typing import Any

from castore.config import Config, load_config
from castore.errors import (
    BackendError,
    BackendUnavailable,
    CastoreError,
    ConfigError,
    CorruptChunkError,
    FormatError,
    InvalidKeyError,
    ManifestError,
    ReadOnlyError,
    UnsupportedFormatVersion,
    UntrustedEntryError,
)
from castore.store import PutResult, Store
from castore.version import __version__


def open_store(url: str | None = None, *, config: Config | None = None, **overrides: Any) -> Store:
    """Open the configured store: backend by URL, read-only wrapper, local read-through layer, signing keys."""
    from castore.backends import ReadOnlyBackend, open_backend
    from castore.local_layer import LocalLayer
    from castore.signing import from_config

    if config is None:
        config = load_config({"url": url, **overrides})
    trust, signing_key = from_config(config)  # keys first: a bad key fails here, before any connection
    options = {}
    if config.url.startswith(("s3://", "gs://", "az://")):
        options = {
            "connect_timeout": config.connect_timeout,
            "read_timeout": config.read_timeout,
            "request_timeout": config.request_timeout,
            "max_attempts": config.max_attempts,
            "max_concurrency": config.workers,
        }
    backend = open_backend(config.url, **options)
    if config.read_only:
        backend = ReadOnlyBackend(backend)
    # A local layer in front of a local store only duplicates it.
    if config.cache_size > 0 and not config.url.startswith(("file://", "memory://", "/")):
        backend = LocalLayer(backend, config.cache_dir, config.cache_size)
    return Store(backend, read_only=config.read_only, workers=config.workers, trust=trust, signing_key=signing_key)


__all__ = [
    "BackendError",
    "BackendUnavailable",
    "CastoreError",
    "Config",
    "ConfigError",
    "CorruptChunkError",
    "FormatError",
    "InvalidKeyError",
    "ManifestError",
    "PutResult",
    "ReadOnlyError",
    "Store",
    "UnsupportedFormatVersion",
    "UntrustedEntryError",
    "__version__",
    "load_config",
    "open_store",
]
