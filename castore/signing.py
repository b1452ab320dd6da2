"""Ed25519 manifest signatures: key pairs, their text format, signing, and a reader's trust policy.

Key text follows Nix's binary-cache keys: a public key is ``name:base64(32-byte key)``; a secret key file holds
``name:base64(32-byte seed + 32-byte public key)``. The ``cryptography`` package is imported only when a key is
used, so ``import castore`` and a store without keys never load it. See docs/FORMAT.md, 'Signatures', and
SECURITY.md.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from castore.errors import ConfigError
from castore.format.manifest import LEGACY_FORMAT_VERSION, Envelope, signed_message

log = logging.getLogger(__name__)

KEY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
PUBLIC_KEY_BYTES = 32
SEED_BYTES = 32
MAX_KEY_FILE_BYTES = 64 << 10
VERIFIED_CACHE_ENTRIES = 1 << 16


def _ed25519() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ConfigError("signing keys need the 'cryptography' package (pip install cryptography)") from exc
    return ed25519


@functools.cache
def _invalid_signature() -> type[Exception]:
    from cryptography.exceptions import InvalidSignature

    return InvalidSignature


def validate_key_name(name: str) -> str:
    if not isinstance(name, str) or not KEY_NAME_RE.fullmatch(name):
        raise ConfigError(f"invalid key name {name!r}: use letters, digits and . _ + - (at most 128), starting with a letter or digit")
    return name


def _split(text: str, what: str, size: int) -> tuple[str, bytes]:
    """'name:base64' -> (name, bytes of exactly ``size``). Error messages never quote the secret part."""
    name, sep, encoded = text.strip().partition(":")
    if not sep:
        raise ConfigError(f"{what} is not of the form NAME:BASE64")
    validate_key_name(name)
    try:
        raw = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{what} {name!r}: the part after ':' is not base64") from exc
    if len(raw) != size:
        raise ConfigError(f"{what} {name!r}: expected {size} bytes of key, found {len(raw)}")
    return name, raw


@dataclass(frozen=True)
class PublicKey:
    name: str
    raw: bytes = field(repr=False)
    _verifier: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        name, raw = _split(text, "public key", PUBLIC_KEY_BYTES)
        return cls(name, raw)

    def text(self) -> str:
        return f"{self.name}:{base64.b64encode(self.raw).decode()}"

    def verifier(self) -> Any:
        """The loaded cryptography key, built once per PublicKey (no per-lookup key parsing)."""
        if self._verifier is None:
            try:
                key = _ed25519().Ed25519PublicKey.from_public_bytes(self.raw)
            except ValueError as exc:
                raise ConfigError(f"public key {self.name!r} is not a valid ed25519 key") from exc
            object.__setattr__(self, "_verifier", key)
        return self._verifier

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            self.verifier().verify(signature, message)
        except _invalid_signature():
            return False
        return True


class SecretKey:
    """A named ed25519 signing key. Its repr and str never show the secret."""

    def __init__(self, name: str, seed: bytes) -> None:
        self.name = validate_key_name(name)
        self._private = _ed25519().Ed25519PrivateKey.from_private_bytes(seed)
        from cryptography.hazmat.primitives import serialization

        raw_public = self._private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public = PublicKey(self.name, raw_public)

    def __repr__(self) -> str:
        return f"SecretKey({self.name!r})"

    __str__ = __repr__

    @classmethod
    def generate(cls, name: str) -> SecretKey:
        validate_key_name(name)
        return cls(name, os.urandom(SEED_BYTES))

    @classmethod
    def parse(cls, text: str) -> SecretKey:
        name, raw = _split(text, "secret key", SEED_BYTES + PUBLIC_KEY_BYTES)
        key = cls(name, raw[:SEED_BYTES])
        if key.public.raw != raw[SEED_BYTES:]:
            raise ConfigError(f"secret key {name!r} is damaged: its public half does not match its seed")
        return key

    def text(self) -> str:
        from cryptography.hazmat.primitives import serialization

        seed = self._private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        return f"{self.name}:{base64.b64encode(seed + self.public.raw).decode()}"

    def sign_body(self, body: bytes) -> tuple[str, bytes]:
        """The signature entry of a manifest body: (key name, ed25519 signature of signed_message(body))."""
        return self.name, self._private.sign(signed_message(body))


def _read_key_file(path: str | os.PathLike[str], what: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {os.fspath(path)}: {exc.strerror or exc}") from exc
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ConfigError(f"{what} file {os.fspath(path)} is too large to be a key")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} file {os.fspath(path)} is not a key (not ASCII text)") from exc


def load_secret_key(path: str | os.PathLike[str]) -> SecretKey:
    text = _read_key_file(path, "signing key")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = 0
    if mode & 0o077:
        log.warning("castore: signing key file %s is readable by other users (mode %o); chmod 600 it", os.fspath(path), mode & 0o777)
    try:
        return SecretKey.parse(text)
    except ConfigError as exc:
        raise ConfigError(f"signing key file {os.fspath(path)}: {exc}") from None


def secret_key_name(path: str | os.PathLike[str]) -> str:
    """The name in a signing key file, read without loading (or showing) the secret."""
    name = _read_key_file(path, "signing key").strip().partition(":")[0]
    return validate_key_name(name)


_BASE64_TEXT_RE = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_PUBLIC_KEY_TEXT_CHARS = 4 * ((PUBLIC_KEY_BYTES + 2) // 3)


def is_inline_public_key(entry: str) -> bool:
    """Whether a trusted_keys entry is an inline ``name:base64`` key rather than a path. Base64 may contain and
    begin with "/", so a value of exactly a public key's length is a key whatever its characters; a shorter or
    longer value is one only without a "/" (``ci:/keys/ci`` is a path). An existing file always wins."""
    name, sep, rest = entry.partition(":")
    if not sep or KEY_NAME_RE.fullmatch(name) is None or _BASE64_TEXT_RE.fullmatch(rest) is None:
        return False
    if "/" in rest and len(rest) != _PUBLIC_KEY_TEXT_CHARS:
        return False
    return not os.path.exists(os.path.expanduser(entry))


def load_public_keys(entries: Iterable[str]) -> list[PublicKey]:
    """Trusted keys from config entries: inline ``name:base64`` values, or paths to files of such lines
    (blank lines and ``#`` comments allowed). Raises ConfigError for a bad entry or two keys of one name."""
    keys: list[PublicKey] = []
    for entry in entries:
        entry = entry.strip()
        if not entry:
            continue
        if is_inline_public_key(entry):
            keys.append(PublicKey.parse(entry))
            continue
        path = os.path.expanduser(entry)
        text = _read_key_file(path, "public key")
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                try:
                    keys.append(PublicKey.parse(line))
                except ConfigError as exc:
                    raise ConfigError(f"{path}: {exc}") from None
    by_name: dict[str, PublicKey] = {}
    for key in keys:
        if by_name.setdefault(key.name, key).raw != key.raw:
            raise ConfigError(f"two different trusted keys are named {key.name!r}")
    return list(by_name.values())


def write_key_pair(key: SecretKey, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write NAME.key (mode 0600, created exclusively) and NAME.pub into directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    secret_path, public_path = directory / f"{key.name}.key", directory / f"{key.name}.pub"
    for path in (secret_path, public_path):
        if path.exists() or path.is_symlink():
            raise ConfigError(f"{path} exists; not overwriting a key")
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # whatever the umask
        f.write(key.text() + "\n")
    fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(key.public.text() + "\n")
    return secret_path, public_path


# -- the reader's side --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """What a reader concluded about one manifest object."""

    trusted: bool  # may be used
    reason: str
    verified_by: str | None = None  # the trusted key whose signature verified
    signers: tuple[str, ...] = ()  # key names on the object's signatures, verified or not


def unchecked(envelope: Envelope) -> Verdict:
    """The verdict of a reader without trusted keys that does not require signatures."""
    return Verdict(True, "signatures not checked (no trusted keys configured)", None, tuple(n for n, _ in envelope.signatures))


class TrustPolicy:
    """A set of trusted public keys (several during a rotation; removing one revokes what it alone signed) and
    whether every entry must carry a valid signature by one of them."""

    def __init__(self, keys: Iterable[PublicKey] = (), *, require: bool = False) -> None:
        self.keys: dict[str, PublicKey] = {}
        for key in keys:
            if self.keys.setdefault(key.name, key).raw != key.raw:
                raise ConfigError(f"two different trusted keys are named {key.name!r}")
        self.require = require
        # (body checksum, key name, signature) that verified: a process that reads one manifest twice (a
        # prefetch, then the lookup) verifies it once. The checksum was checked, so it stands for the body.
        self._verified: dict[tuple[bytes, str, bytes], None] = {}
        for key in self.keys.values():
            key.verifier()  # load every key once, now: a bad key is a ConfigError at open, not a miss per lookup

    @property
    def active(self) -> bool:
        return bool(self.keys) or self.require

    def check(self, envelope: Envelope) -> Verdict:
        signers = tuple(name for name, _ in envelope.signatures)
        if envelope.format == LEGACY_FORMAT_VERSION:
            if self.require:
                return Verdict(False, "unsigned legacy (format 1) manifest; signatures are required", None, signers)
            return Verdict(True, "legacy (format 1) manifest, unsigned; signatures not required", None, signers)
        failed = []
        for name, signature in envelope.signatures:
            key = self.keys.get(name)
            if key is None:
                continue
            seen = (envelope.checksum, name, signature)
            if seen in self._verified or key.verify(signature, envelope.message):
                if len(self._verified) < VERIFIED_CACHE_ENTRIES:
                    self._verified[seen] = None
                return Verdict(True, f"signed by trusted key {name!r}", name, signers)
            failed.append(name)
        if failed:
            # A signature that claims a trusted key and does not verify is tampering, required or not.
            return Verdict(False, f"signature by key {failed[0]!r} does not verify (altered or forged)", None, signers)
        if not signers:
            why = "unsigned"
        else:
            why = "signed only by untrusted or revoked key(s) " + ", ".join(repr(n) for n in signers)
        if self.require:
            return Verdict(False, f"{why}; signatures by a trusted key are required", None, signers)
        return Verdict(True, f"{why}; signatures not required", None, signers)


def from_config(config: Any) -> tuple[TrustPolicy | None, SecretKey | None]:
    """A Config's trust policy (None when it checks nothing: no keys, signatures not required) and signing key.

    A writer with a signing key also trusts that key's public half."""
    signer = load_secret_key(config.signing_key) if config.signing_key else None
    entries = list(config.trusted_keys)
    keys = load_public_keys(entries) if entries else []
    if signer is not None:
        if any(k.name == signer.name and k.raw != signer.public.raw for k in keys):
            raise ConfigError(f"the signing key {signer.name!r} differs from the trusted key of that name")
        if all(k.name != signer.name for k in keys):
            keys.append(signer.public)
    if not keys and not config.require_signatures:
        return None, signer
    if not keys:
        raise ConfigError("require_signatures is on but no trusted_keys (or signing_key) are configured")
    return TrustPolicy(keys, require=config.require_signatures), signer
