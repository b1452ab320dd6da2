"""Shared fixtures. Keep each fixture small and self-contained: several test modules use this file."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest


# -- SeaweedFS (a real S3 server on 127.0.0.1) --------------------------------------------------------
@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[object]:
    """One SeaweedFS S3 server for the whole session. A missing ``weed`` binary is an error, never a skip."""
    from castore.testing.seaweedfs import SeaweedFS

    with SeaweedFS() as server:
        yield server


@pytest.fixture
def s3_bucket(seaweedfs) -> str:  # noqa: ANN001
    """A fresh, empty bucket on the session's SeaweedFS server."""
    return seaweedfs.create_bucket(f"t-{uuid.uuid4().hex[:20]}")


@pytest.fixture
def s3_url(seaweedfs, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> str:  # noqa: ANN001
    """``s3://<fresh bucket>/prefix?endpoint=...`` with the server's AWS_* credentials in os.environ."""
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return seaweedfs.url(s3_bucket, "prefix")


@pytest.fixture
def s3_env(seaweedfs) -> dict[str, str]:  # noqa: ANN001
    """A complete environment for subprocesses that talk to the session's server (os.environ + AWS_*)."""
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_PROFILE", "AWS_SESSION_TOKEN")}
    env.update(seaweedfs.env())
    return env
