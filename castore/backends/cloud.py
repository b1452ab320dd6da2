"""gs://bucket/prefix (Google Cloud Storage) and az://container/prefix (Azure Blob Storage), through obstore.

    gs://bucket/prefix[?endpoint=http://host:port&anonymous=1]
    az://container/prefix?account=NAME[&endpoint=http://host:port/NAME&anonymous=1]

Credentials are obstore's own: for GCS, GOOGLE_SERVICE_ACCOUNT / GOOGLE_SERVICE_ACCOUNT_KEY /
GOOGLE_APPLICATION_CREDENTIALS / GOOGLE_BEARER_TOKEN, else the gcloud application-default file, else the
metadata server; for Azure,
AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_KEY, a client secret (AZURE_CLIENT_ID / AZURE_CLIENT_SECRET /
AZURE_TENANT_ID), workload identity (AZURE_FEDERATED_TOKEN_FILE), else managed identity. ``endpoint=`` points at
an emulator or a private endpoint; ``anonymous=1`` sends unsigned requests (public buckets, emulators).
"""

from __future__ import annotations

import os
import re
from typing import Any

from castore.backends.base import redact
from castore.backends.objstore import ObstoreBackend, client_options, retry_config
from castore.backends.s3 import parse_endpoint, split_store_url
from castore.config import parse_bool
from castore.errors import ConfigError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,221}")
_PARAMS = {"gs": ("endpoint", "anonymous"), "az": ("account", "endpoint", "anonymous")}


def _credential_source(scheme: str, anonymous: bool) -> str:
    if anonymous:
        return "none (anonymous)"
    env = os.environ
    names = {
        "gs": ("GOOGLE_SERVICE_ACCOUNT", "GOOGLE_SERVICE_ACCOUNT_PATH", "GOOGLE_SERVICE_ACCOUNT_KEY", "GOOGLE_APPLICATION_CREDENTIALS",
               "GOOGLE_BEARER_TOKEN"),
        "az": ("AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_KEY", "AZURE_CLIENT_SECRET", "AZURE_FEDERATED_TOKEN_FILE"),
    }[scheme]
    found = next((n for n in names if env.get(n)), None)
    if found:
        return f"environment ({found})"
    return "application default / metadata server" if scheme == "gs" else "managed identity"


class CloudBackend(ObstoreBackend):
    def __init__(self, url: str, *, connect_timeout: float = 2.0, read_timeout: float = 10.0, request_timeout: float = 30.0,
                 max_attempts: int = 4, max_concurrency: int = 16, list_page_size: int = 1000) -> None:  # fmt: skip
        shown = redact(url)
        parts, query = split_store_url(url, "not a store URL", max_fields=10)
        scheme = parts.scheme
        if scheme not in _PARAMS or not _NAME.fullmatch(parts.netloc or "") or parts.fragment:
            raise ConfigError(f"not a {scheme}://bucket/prefix URL: {shown!r}")
        unknown = sorted(set(query) - set(_PARAMS[scheme]))
        if unknown or any(len(v) > 1 for v in query.values()):
            raise ConfigError(f"{shown!r}: unknown or repeated parameters; known: {list(_PARAMS[scheme])}")
        q = {k: v[0] for k, v in query.items()}
        prefix = parts.path.strip("/")
        if prefix and any(s in ("", ".", "..") for s in prefix.split("/")):
            raise ConfigError(f"bad prefix {prefix!r} in {shown!r}")
        endpoint = parse_endpoint(q["endpoint"]) if q.get("endpoint") else None
        anonymous = parse_bool(q.get("anonymous", "0"))
        options = client_options(connect_timeout=connect_timeout, read_timeout=read_timeout, request_timeout=request_timeout,
                                 allow_http=bool(endpoint and endpoint.startswith("http:")))  # fmt: skip
        retries = retry_config(max_attempts=max_attempts, request_timeout=request_timeout)
        config: dict[str, Any] = {"skip_signature": True} if anonymous else {}
        try:
            if scheme == "gs":
                from obstore.store import GCSStore

                if endpoint:
                    config["base_url"] = endpoint
                store: Any = GCSStore(parts.netloc, config=config, client_options=options, retry_config=retries)
            else:
                from obstore.store import AzureStore

                account = q.get("account") or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
                if not account or not _NAME.fullmatch(account):
                    raise ConfigError(f"{shown!r}: az:// needs ?account=NAME (or AZURE_STORAGE_ACCOUNT_NAME)")
                config["account_name"] = account
                if endpoint:
                    config["endpoint"] = endpoint
                store = AzureStore(parts.netloc, config=config, client_options=options, retry_config=retries)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - obstore's configuration errors
            raise ConfigError(f"{shown}: {redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)}") from None
        self._describe = {
            "endpoint": endpoint or ("https://storage.googleapis.com" if scheme == "gs" else f"https://{config['account_name']}.blob.core.windows.net"),
            "credentials": _credential_source(scheme, anonymous),
        }
        self.max_attempts = max_attempts
        clean = f"{scheme}://{parts.netloc}/{prefix}".rstrip("/")
        extra = "&".join(f"{k}={q[k]}" for k in ("account", "anonymous") if q.get(k))
        extra = "&".join(x for x in (f"endpoint={endpoint}" if endpoint else "", extra) if x)
        super().__init__(store, url=clean + (f"?{extra}" if extra else ""), prefix=prefix + "/" if prefix else "",
                         max_concurrency=max_concurrency, list_page_size=list_page_size,
                         etag_is_md5=False)  # fmt: skip

    def describe(self) -> dict[str, str]:
        return dict(self._describe)


def open_cloud_backend(url: str, **options: Any) -> CloudBackend:
    return CloudBackend(url, **options)
