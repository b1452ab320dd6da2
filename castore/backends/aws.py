"""Where an s3:// store's endpoint, region, addressing style and credentials come from, as the AWS SDKs decide.

Reads the environment and the AWS shared files (``~/.aws/config``, ``~/.aws/credentials``, or the files
AWS_CONFIG_FILE and AWS_SHARED_CREDENTIALS_FILE name) with configparser: cheap enough for every process, and
botocore is imported only for a profile that needs it (SSO, assume-role, credential_process). Nothing here
talks to the network or to obstore.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from castore.errors import ConfigError

# Profile keys whose credentials need botocore's machinery (tokens, role chains, processes).
_BOTOCORE_KEYS = ("sso_session", "sso_start_url", "sso_account_id", "role_arn", "credential_process", "credential_source",
                  "web_identity_token_file")  # fmt: skip


def _env(env: Mapping[str, str], *names: str) -> str | None:
    return next((env[n] for n in names if env.get(n)), None)


def _read_ini(path: str) -> dict[str, dict[str, str]]:
    if not os.path.isfile(path):
        return {}
    parser = configparser.RawConfigParser(default_section="\x00castore-no-defaults")
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise ConfigError(f"cannot read AWS file {path}: {type(exc).__name__}") from None  # its text may hold keys
    return {name: dict(parser.items(name)) for name in parser.sections()}


def _nested(value: str) -> dict[str, str]:
    """The ``s3 =`` sub-section of a profile: indented ``key = value`` lines."""
    out = {}
    for line in value.splitlines():
        name, sep, val = line.partition("=")
        if sep and name.strip():
            out[name.strip().lower()] = val.strip()
    return out


@dataclass
class AwsProfile:
    """The active profile's settings from the config file and its keys from the credentials file."""

    name: str
    explicit: bool  # named by AWS_PROFILE (a missing one is an error, not the empty default)
    config: dict[str, str] = field(default_factory=dict)
    credentials: dict[str, str] = field(default_factory=dict)
    found: bool = False

    @property
    def s3(self) -> dict[str, str]:
        return _nested(self.config.get("s3", ""))

    @classmethod
    def load(cls, env: Mapping[str, str]) -> AwsProfile:
        named = _env(env, "AWS_PROFILE", "AWS_DEFAULT_PROFILE")
        name = named or "default"
        config_file = os.path.expanduser(_env(env, "AWS_CONFIG_FILE") or "~/.aws/config")
        creds_file = os.path.expanduser(_env(env, "AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials")
        config = _read_ini(config_file)
        creds = _read_ini(creds_file)
        if name == "default":
            section = config.get("default") or config.get("profile default") or {}
        else:
            section = config.get(f"profile {name}", {})
        profile = cls(name, named is not None, dict(section), dict(creds.get(name, {})))
        profile.found = bool(section) or name in creds
        if profile.explicit and not profile.found:
            raise ConfigError(f"AWS profile {name!r} (AWS_PROFILE) is in neither {config_file} nor {creds_file}")
        return profile


@dataclass(frozen=True)
class Credentials:
    """Where the credentials come from. ``static`` keys are passed to the client; ``botocore`` means botocore's
    provider chain (for ``botocore_profile``); otherwise obstore's own providers fetch them (web identity,
    container, instance metadata). Never printed with the secret."""

    source: str
    static: tuple[str, str, str | None] | None = None
    botocore: bool = False
    botocore_profile: str | None = None  # None: botocore's default profile

    def __repr__(self) -> str:
        return f"Credentials(source={self.source!r})"


def resolve_credentials(env: Mapping[str, str], profile: AwsProfile) -> Credentials:
    """The AWS SDKs' order: environment, web identity (environment), the profile (keys, SSO, roles,
    processes), container, instance metadata."""
    key, secret = _env(env, "AWS_ACCESS_KEY_ID"), _env(env, "AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return Credentials("environment", (key, secret, _env(env, "AWS_SESSION_TOKEN")))
    if _env(env, "AWS_WEB_IDENTITY_TOKEN_FILE") and _env(env, "AWS_ROLE_ARN"):
        return Credentials("web identity")
    if profile.found:
        merged = {**profile.config, **profile.credentials}
        if any(k in merged for k in _BOTOCORE_KEYS):
            kind = "sso" if any(k.startswith("sso_") for k in merged) else "profile"
            return Credentials(f"{kind} {profile.name} (botocore)", botocore=True, botocore_profile=profile.name)
        key, secret = merged.get("aws_access_key_id"), merged.get("aws_secret_access_key")
        if key and secret:
            return Credentials(f"profile {profile.name}", (key, secret, merged.get("aws_session_token")))
    if _env(env, "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):  # ECS
        return Credentials("container")
    if _env(env, "AWS_CONTAINER_CREDENTIALS_FULL_URI"):  # EKS Pod Identity and others
        if _env(env, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"):
            return Credentials("container")
        return Credentials("container (botocore)", botocore=True)  # a token in the environment, or none at all
    if (_env(env, "AWS_EC2_METADATA_DISABLED") or "").lower() == "true":
        return Credentials("none")
    return Credentials("instance")


def resolve_region(url_region: str | None, env: Mapping[str, str], profile: AwsProfile) -> tuple[str, str]:
    """(region, where it came from)."""
    if url_region:
        return url_region, "URL"
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if env.get(name):
            return env[name], name
    if profile.config.get("region"):
        return profile.config["region"], f"AWS config file, profile {profile.name}"
    return "us-east-1", "default"


def resolve_endpoint(url_endpoint: str | None, env: Mapping[str, str], profile: AwsProfile) -> tuple[str | None, str]:
    """(endpoint or None for AWS itself, where it came from): the URL, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL,
    the profile's ``s3 = endpoint_url``, the profile's ``endpoint_url``."""
    if url_endpoint:
        return url_endpoint, "URL"
    if (_env(env, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS") or "").lower() == "true":
        return None, "AWS"
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if env.get(name):
            return env[name], name
    if profile.s3.get("endpoint_url"):
        return profile.s3["endpoint_url"], f"AWS config file, profile {profile.name}, s3 endpoint_url"
    if profile.config.get("endpoint_url"):
        return profile.config["endpoint_url"], f"AWS config file, profile {profile.name}, endpoint_url"
    return None, "AWS"


def proxy_for(scheme: str, env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(proxy URL, the variable that set it) for requests of this scheme, as the HTTP client reads them."""
    names = ("HTTPS_PROXY", "https_proxy") if scheme == "https" else ("HTTP_PROXY", "http_proxy")
    for name in (*names, "ALL_PROXY", "all_proxy"):
        if env.get(name):
            return env[name], name
    return None, None
