"""Typed errors. Everything castore raises on purpose derives from CastoreError."""

from __future__ import annotations


class CastoreError(Exception):
    """Base class of every error castore raises deliberately."""


class InvalidKeyError(CastoreError, ValueError):
    """A namespace or key is not allowed (path separators, '..', NUL, too long, ...)."""


class FormatError(CastoreError):
    """Stored bytes do not follow docs/FORMAT.md."""


class ManifestError(FormatError):
    """A manifest is malformed, oversized or internally inconsistent."""


class UnsupportedFormatVersion(FormatError):
    """A manifest or chunk declares a format version this reader does not know."""

    def __init__(self, found: object, supported: int) -> None:
        super().__init__(f"format version {found!r} is not supported (this castore reads version {supported})")
        self.found = found
        self.supported = supported


class UntrustedEntryError(FormatError):
    """A manifest this reader's trust policy refuses: unsigned while signatures are required, signed by no
    trusted key, a signature that does not verify, or an entry moved from the key it was written for."""


class MovedEntryError(UntrustedEntryError):
    """An intact manifest stored under a key other than the one it was written for (copied, or swapped)."""


class UnsafeTreeError(FormatError):
    """A stored directory tree cannot be restored safely (an entry escapes DEST, is duplicated, crosses a
    symlink, ...). Raised before anything is written."""


class CorruptChunkError(FormatError):
    """A chunk's bytes do not match its digest or declared size."""


class BackendError(CastoreError):
    """The storage backend failed (network, permissions, server error). Never means 'not found'.

    ``status`` (HTTP) and ``code`` (the S3 error code, e.g. SlowDown, AccessDenied) say what the server answered,
    where it answered: callers tell throttling and refusals apart by them."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class BackendUnavailable(BackendError):
    """The backend could not be reached within its timeouts."""


class ReadOnlyError(CastoreError):
    """A write was attempted on a read-only store."""


class ConfigError(CastoreError, ValueError):
    """The configuration is invalid."""


class KeyExistsError(CastoreError):
    """put(..., overwrite=False) found the key already published."""


def is_access_denied(exc: BaseException) -> bool:
    """Whether a failed write was refused for want of permission (read-only credentials, a read-only store),
    as opposed to a fault worth retrying or reporting. Backends' errors carry an HTTP ``status`` or S3 ``code``."""
    if isinstance(exc, ReadOnlyError):
        return True
    status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
    code = str(getattr(exc, "code", "") or "")
    return status == 403 or code in ("AccessDenied", "AllAccessDisabled", "Forbidden") or "AccessDenied" in str(exc)
