"""Secrets never printed: the password of a URL is replaced before a URL or message is shown."""

from __future__ import annotations

import re
from urllib.parse import unquote

_AUTHORITY = re.compile(r"(?i)([a-z][a-z0-9+.-]*://)([^/?#\s]*)")


def _redact_authority(m: re.Match[str]) -> str:
    userinfo, at, host = m.group(2).rpartition("@")
    if not at or ":" not in userinfo:
        return m.group(0)
    return m.group(1) + userinfo.split(":", 1)[0] + ":***@" + host


def redact(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` in it replaced by ``***``, also
    where the URL is percent-encoded (an endpoint inside a store URL's query). Safe for any string."""
    out = _AUTHORITY.sub(_redact_authority, text)
    if "%" in out:
        decoded = unquote(out)
        redacted = _AUTHORITY.sub(_redact_authority, decoded)
        if redacted != decoded:
            return redacted
    return out
