"""Configuration: explicit arguments > environment > config files > defaults, each value knowing its source.

Files, first found wins per value: ./castore.toml, ./pyproject.toml [tool.castore],
$XDG_CONFIG_HOME/castore/config.toml (default ~/.config/castore/config.toml).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from castore.errors import ConfigError


def _user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "castore"


def parse_size(value: object) -> int:
    """'10G', '512MiB', '1.5 GB', 4096 -> bytes (binary multiples)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ConfigError(f"not a size: {value!r} (try 512M or 10G)")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index((m.group(2) or "_").lower()))


def parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"not a boolean: {value!r}")


class KeyList(tuple[str, ...]):
    """Trusted public keys (inline ``name:base64`` values or paths of .pub files). Prints comma-separated: the
    form CASTORE_TRUSTED_KEYS reads back (job environments export every setting as text)."""

    def __str__(self) -> str:
        return ",".join(self)


def parse_key_list(value: object) -> KeyList:
    """A list (config file) or a comma/whitespace separated string (environment) of trusted public keys, each
    checked now: a bad key or an unreadable key file is a ConfigError, not a store that trusts nothing."""
    from castore.signing import is_inline_public_key, load_public_keys

    if isinstance(value, str):
        items = re.split(r"[,\s]+", value)
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = list(value)
    else:
        raise ConfigError("trusted_keys must be a list of public keys (NAME:BASE64) or paths of .pub files")
    # Paths become absolute: job environments carry them to processes with other working directories.
    entries = [item if is_inline_public_key(item) else os.path.abspath(os.path.expanduser(item)) for item in (i.strip() for i in items) if item]
    load_public_keys(entries)
    return KeyList(entries)


def parse_signing_key(value: object) -> str:
    """The path of a signing key file ('' for none), checked for a key name without reading the secret into
    anything that could print it."""
    from castore.signing import secret_key_name

    path = os.path.expanduser(str(value).strip())
    if path:
        path = os.path.abspath(path)
        secret_key_name(path)
    return path


LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_log_level(value: object) -> str:
    """'DEBUG', 'info', 'warn' -> a name of LOG_LEVELS; '' or 'off' -> ''."""
    text = str(value).strip().lower()
    text = {"warn": "warning", "off": "", "none": ""}.get(text, text)
    if text and text not in LOG_LEVELS:
        raise ConfigError(f"not a log level: {value!r} (one of {', '.join(LOG_LEVELS)}, or empty for off)")
    return text


@dataclass
class Config:
    url: str = field(default_factory=lambda: "file://" + str(_user_cache_dir() / "store"))
    cache_dir: str = field(default_factory=lambda: str(_user_cache_dir() / "local"))
    cache_size: int = 10 << 30  # 0 turns the local layer off
    read_only: bool = False
    connect_timeout: float = 2.0
    read_timeout: float = 10.0  # the longest wait for the next bytes of an answer
    request_timeout: float = 30.0  # the deadline of one attempt, connecting to last byte (a trickling server)
    max_attempts: int = 4
    workers: int = 16
    # Torch integration: after a store error, skip the store for this many seconds (bounds the added delay).
    error_backoff: float = 60.0
    # Torch integration: a get slower than this opens the circuit breaker too (a slow store costs more than it saves).
    slow_request: float = 1.0
    # Torch integration: the longest a compile waits on one store lookup, whatever the timeouts and retries below.
    store_wait: float = 5.0
    # Torch integration: how long process exit waits for background uploads.
    flush_timeout: float = 30.0
    # Torch integration: at a process's first graph lookup, fetch in parallel everything the last process that
    # compiled that graph used (its fetch plan), instead of one request after another.
    prefetch: bool = True
    # Signing (SECURITY.md): writers sign with this key file; readers accept only entries signed by a trusted key
    # when signatures are required (the default as soon as any trusted key or a signing key is configured).
    signing_key: str = ""
    trusted_keys: KeyList = field(default_factory=KeyList)
    require_signatures: bool = False
    # castore's log messages on stderr, at this level and above (debug, info, warning, error), in every process of
    # a torch job; empty: Python's default (warnings only, unless the program configures logging).
    log: str = ""
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def describe(self) -> list[tuple[str, object, str]]:
        """(name, value, source) of every setting; the URL with any password in it replaced by ***."""
        from castore.redact import redact

        return [
            (f.name, redact(self.url) if f.name == "url" else getattr(self, f.name), self.sources.get(f.name, "default"))
            for f in fields(self)
            if f.name != "sources"
        ]

    def __repr__(self) -> str:
        return "Config(" + ", ".join(f"{name}={value!r}" for name, value, _ in self.describe()) + ")"


_PARSERS: dict[str, Any] = {
    "url": str,
    "cache_dir": lambda v: os.path.expanduser(str(v)),
    "cache_size": parse_size,
    "read_only": parse_bool,
    "connect_timeout": float,
    "read_timeout": float,
    "request_timeout": float,
    "max_attempts": int,
    "workers": int,
    "error_backoff": float,
    "slow_request": float,
    "store_wait": float,
    "flush_timeout": float,
    "prefetch": parse_bool,
    "signing_key": parse_signing_key,
    "trusted_keys": parse_key_list,
    "require_signatures": parse_bool,
    "log": parse_log_level,
}
ENV_PREFIX = "CASTORE_"


def config_files(cwd: Path | None = None, env: Mapping[str, str] | None = None) -> list[tuple[Path, str | None]]:
    """Candidate files in precedence order: (path, table inside it or None for the whole file)."""
    cwd = cwd or Path.cwd()
    env = os.environ if env is None else env
    xdg = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return [(cwd / "castore.toml", None), (cwd / "pyproject.toml", "tool.castore"), (xdg / "castore" / "config.toml", None)]


def _read_table(path: Path, table: str | None) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        doc: Any = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    for part in (table or "").split(".") if table else []:
        doc = doc.get(part, {}) if isinstance(doc, dict) else {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: [{table}] is not a table")
    return doc


def load_config(overrides: dict[str, Any] | None = None, *, env: dict[str, str] | None = None, cwd: Path | None = None) -> Config:
    env = os.environ if env is None else env
    layers: list[tuple[str, dict[str, Any]]] = [("argument", {k: v for k, v in (overrides or {}).items() if v is not None})]
    layers.append(("environment", {name: env[ENV_PREFIX + name.upper()] for name in _PARSERS if ENV_PREFIX + name.upper() in env}))
    for path, table in config_files(cwd, env):
        doc = _read_table(path, table)
        unknown = set(doc) - set(_PARSERS)
        if unknown:
            raise ConfigError(f"{path}: unknown settings {sorted(unknown)}; known: {sorted(_PARSERS)}")
        layers.append((str(path) + (f" [{table}]" if table else ""), doc))
    config = Config()
    for name, parse in _PARSERS.items():
        for source, values in layers:
            if name in values:
                try:
                    setattr(config, name, parse(values[name]))
                except (TypeError, ValueError, OverflowError) as exc:  # int(inf) overflows
                    raise ConfigError(f"{name} from {source}: {exc}") from exc
                config.sources[name] = source + (f" {ENV_PREFIX}{name.upper()}" if source == "environment" else "")
                break
    if "require_signatures" not in config.sources:
        config.require_signatures = bool(config.trusted_keys or config.signing_key)
        if config.require_signatures:
            config.sources["require_signatures"] = "default: on, as keys are configured"
    if config.cache_size < 0 or config.workers < 1 or config.max_attempts < 1:
        raise ConfigError("cache_size must be >= 0, workers and max_attempts >= 1")
    for name in ("connect_timeout", "read_timeout", "request_timeout"):
        value = getattr(config, name)
        if not 0 < value < 1e7:  # also refuses nan and inf
            raise ConfigError(f"{name} must be a finite number of seconds > 0, not {value!r} (from {config.sources.get(name)})")
    return config
