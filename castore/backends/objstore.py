"""The Backend interface over obstore (the Python bindings of Rust's object_store crate): S3, GCS, Azure Blob.

obstore signs, retries with exponential backoff and jitter, bounds each attempt by an overall deadline, and
honours HTTP(S)_PROXY / NO_PROXY. This module adds castore's semantics on top: a get of a missing object is
None, an If-None-Match put that finds an object is False, every other failure a typed BackendError
(BackendUnavailable when the server could not be reached or answered in time), messages with no secrets.

Fork: obstore runs its requests on one tokio runtime per process, started by the first request, and a
runtime does not survive fork() (its threads stay in the parent). A process forked after its parent made a
request cannot use obstore at all (requests would hang forever): there every request fails at once with
BackendUnavailable, and the caller (the torch integration) compiles without the store. A child forked before
the parent's first request, or started with spawn / exec, is unaffected.
"""

from __future__ import annotations

import datetime
import re
import os
from collections.abc import Iterator
from typing import Any

import obstore
from obstore.exceptions import AlreadyExistsError, PreconditionError

from castore.backends.base import Backend, ObjectInfo, redact
from castore.errors import BackendError, BackendUnavailable, ConfigError

USER_AGENT = "castore/0.1 (obstore)"
INITIAL_BACKOFF = 0.1  # seconds: a compile waiting on a cache should not sleep seconds on a refused connection
MAX_BACKOFF = 20.0
_runtime_pid: int | None = None  # the process whose obstore runtime our requests started


def _check_runtime() -> None:
    global _runtime_pid
    pid = os.getpid()
    if _runtime_pid is None:
        _runtime_pid = pid
    elif _runtime_pid != pid:
        raise BackendUnavailable(
            "this process was forked from one that had already used the object store client (obstore's runtime "
            "does not survive fork); start workers with spawn, or fork before the first request"
        )


def positive_seconds(name: str, value: object) -> datetime.timedelta:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number of seconds, not {value!r}") from None
    if not 0 < seconds < 1e7:  # also refuses nan and inf
        raise ConfigError(f"{name} must be > 0 seconds (and finite), not {value!r}")
    return datetime.timedelta(seconds=seconds)


def client_options(*, connect_timeout: float, read_timeout: float, request_timeout: float, allow_http: bool) -> dict[str, Any]:
    """obstore's HTTP client settings. ``read_timeout`` bounds each read (a stalled connection), ``timeout``
    the whole attempt from connecting to the last byte (a server that trickles)."""
    return {
        "connect_timeout": positive_seconds("connect_timeout", connect_timeout),
        "read_timeout": positive_seconds("read_timeout", read_timeout),
        "timeout": positive_seconds("request_timeout", request_timeout),
        "allow_http": allow_http,
        "user_agent": USER_AGENT,
    }


def retry_config(*, max_attempts: int, request_timeout: float) -> dict[str, Any]:
    """``max_attempts`` tries in all; no new attempt starts ``request_timeout`` after the first began, so a call
    ends within about twice request_timeout whatever the server does."""
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ConfigError(f"max_attempts must be an integer >= 1, not {max_attempts!r}")
    return {
        "max_retries": max_attempts - 1,
        "backoff": {"init_backoff": datetime.timedelta(seconds=INITIAL_BACKOFF),
                    "max_backoff": datetime.timedelta(seconds=MAX_BACKOFF), "base": 2},
        "retry_timeout": positive_seconds("request_timeout", request_timeout),
    }  # fmt: skip


def _describe(exc: BaseException) -> str:
    """obstore's message, first part only (it appends a multi-line debug dump), secrets removed."""
    text = str(exc).split("\n\nDebug source:", 1)[0].strip()
    text = " ".join(text.split())
    return redact(text[:600])


_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([^<]{1,100})</Code>")


def _answer(text: str) -> tuple[int | None, str | None]:
    """The HTTP status and S3 error code of the server's answer quoted in an obstore error, where there is one."""
    status = _STATUS.search(text)
    code = _CODE.search(text)
    return (int(status.group(1)) if status else None), (code.group(1) if code else None)


def _unreachable(message: str) -> bool:
    if "Server returned non-2xx status code" in message:
        return False
    lowered = message.lower()
    # A deadline or a reset that ends a body mid-way shows as a body error.
    return any(s in lowered for s in ("error sending request", "timed out", "timeout", "connect", "connection", "dns",
                                      "body error"))  # fmt: skip


class ObstoreBackend(Backend):
    """Objects under ``prefix`` in one bucket or container of an obstore store."""

    def __init__(self, store: Any, *, url: str, prefix: str, max_concurrency: int = 16, list_page_size: int = 1000,
                 etag_is_md5: bool = True) -> None:  # fmt: skip
        self._store = store
        self.url = url
        self.prefix = prefix  # '' or ending in '/'
        self.max_concurrency = max_concurrency
        self.list_page_size = list_page_size
        self._etag_is_md5 = etag_is_md5

    def _key(self, path: str) -> str:
        return self.prefix + path

    def _fail(self, op: str, path: str, exc: BaseException) -> BackendError:
        message = f"{self.url}: {op} {path}: {_describe(exc)}"
        if _unreachable(message):
            return BackendUnavailable(message)
        status, code = _answer(str(exc))
        return BackendError(message, status=status, code=code)

    # -- the Backend interface -------------------------------------------------------------------------------
    def get(self, path: str) -> bytes | None:
        _check_runtime()
        try:
            return obstore.get(self._store, self._key(path)).bytes().to_bytes()
        except FileNotFoundError as exc:
            if _missing_container(exc):
                raise self._fail("GET", path, exc) from None
            return None
        except Exception as exc:  # noqa: BLE001 - obstore's errors, typed here
            raise self._fail("GET", path, exc) from None

    def get_range(self, path: str, start: int, end: int) -> bytes | None:
        if end <= start:
            return b""
        _check_runtime()
        try:
            return obstore.get_range(self._store, self._key(path), start=start, end=end).to_bytes()
        except FileNotFoundError as exc:
            if _missing_container(exc):
                raise self._fail("GET", path, exc) from None
            return None
        except Exception as exc:  # noqa: BLE001 - obstore's errors, typed here
            if "416 Range Not Satisfiable" in str(exc):  # a start at or past the end of the object
                return b""
            raise self._fail("GET", path, exc) from None

    def put(self, path: str, data: bytes, *, if_absent: bool = False) -> bool:
        _check_runtime()
        try:
            obstore.put(self._store, self._key(path), data, mode="create" if if_absent else "overwrite", use_multipart=False)
            return True
        except (AlreadyExistsError, PreconditionError) as exc:
            if if_absent:
                return False
            raise self._fail("PUT", path, exc) from None
        except Exception as exc:  # noqa: BLE001
            if if_absent and "409 Conflict" in str(exc):  # S3's ConditionalRequestConflict: another writer is first
                return False
            raise self._fail("PUT", path, exc) from None

    def head(self, path: str) -> ObjectInfo | None:
        _check_runtime()
        try:
            meta = obstore.head(self._store, self._key(path))
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001
            raise self._fail("HEAD", path, exc) from None
        return self._info(meta)

    def exists(self, path: str) -> bool:
        return self.head(path) is not None

    def delete(self, path: str) -> None:
        _check_runtime()
        try:
            obstore.delete(self._store, self._key(path))
        except FileNotFoundError:
            return
        except Exception as exc:  # noqa: BLE001
            raise self._fail("DELETE", path, exc) from None

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        for path, info in self.scan(prefix):
            yield path, info.size

    def scan(self, prefix: str) -> Iterator[tuple[str, ObjectInfo]]:
        """Objects whose path starts with ``prefix``. object_store lists whole path segments, so a prefix that
        ends inside a segment lists its directory from just before it and stops after the last match."""
        _check_runtime()
        full = self._key(prefix)
        directory, _, partial = full.rpartition("/")
        offset = None
        if partial:
            offset = full[:-1] if len(full) > 1 and not full[:-1].endswith("/") else None
        strip = len(self.prefix)
        try:
            stream = obstore.list(self._store, directory or None, offset=offset, chunk_size=self.list_page_size)
            for batch in stream:
                for meta in batch:
                    name = meta["path"]
                    if not name.startswith(full):
                        if partial and name > full:
                            return
                        continue
                    yield name[strip:], self._info(meta)
        except Exception as exc:  # noqa: BLE001
            raise self._fail("LIST", prefix, exc) from None

    def _info(self, meta: Any) -> ObjectInfo:
        etag = (meta.get("e_tag") or "").strip('"')
        md5 = etag if self._etag_is_md5 and _is_md5(etag) else None
        modified = meta.get("last_modified")
        return ObjectInfo(int(meta["size"]), md5, modified.timestamp() if modified is not None else None)

    def describe(self) -> dict[str, str]:
        """What ``castore config`` prints of this store (never a secret)."""
        return {}


def _missing_container(exc: BaseException) -> bool:
    """A 404 that names the bucket or container, not the object: an error, never a miss. (A HEAD's 404 has
    no body to tell; a missing bucket then looks like a missing object.)"""
    text = str(exc)
    return any(code in text for code in ("NoSuchBucket", "ContainerNotFound", "The specified bucket does not exist"))


def _is_md5(etag: str) -> bool:
    return len(etag) == 32 and all(c in "0123456789abcdef" for c in etag)
