"""castore: a content-addressed store for torch.compile artifacts on S3-compatible object storage.

``import castore`` never imports torch, nor the object store client (obstore) unless an s3://, gs:// or az://
store is opened.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
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
        try:
            check_writable_dir(config.cache_dir)
            backend = LocalLayer(backend, config.cache_dir, config.cache_size)
        except OSError as exc:  # the bucket may be fine: lose the node's copy, not the store
            report_unusable_cache_dir(config, exc)
    return Store(backend, read_only=config.read_only, workers=config.workers, trust=trust, signing_key=signing_key)


def check_writable_dir(path: str) -> None:
    """Create ``path`` if needed and write a file in it; OSError if that cannot be done (also as root)."""
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
        pass


_cache_dir_reported = threading.Event()


def report_unusable_cache_dir(config: Config, exc: OSError) -> None:
    """One warning per process naming the setting, where its value came from, and what is lost."""
    if _cache_dir_reported.is_set():
        return
    _cache_dir_reported.set()
    source = config.sources.get("cache_dir", "default")
    logging.getLogger("castore").warning(
        "castore: cache_dir %s (from %s) cannot be used (%s): no node-local copies and no `castore stats` "
        "records on this node; the store itself is used as usual",
        config.cache_dir, source, exc.strerror or exc,
    )


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
