"""Backend.get_range: part of an object, the same answer from every backend (packs are read this way)."""

from __future__ import annotations

import pytest

from castore.backends import open_backend


def _cases(backend) -> list[bytes | None]:  # noqa: ANN001
    backend.put("packs/p", b"0123456789")
    return [
        backend.get_range("packs/p", 2, 5),
        backend.get_range("packs/p", 0, 10),
        backend.get_range("packs/p", 8, 20),  # runs past the end: what there is
        backend.get_range("packs/p", 20, 30),  # starts past the end: nothing
        backend.get_range("packs/p", 4, 4),
        backend.get_range("packs/missing", 0, 3),
    ]


EXPECTED = [b"234", b"0123456789", b"89", b"", b"", None]


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_ranges_of_local_backends(scheme: str, tmp_path) -> None:  # noqa: ANN001
    url = f"file://{tmp_path}/store" if scheme == "file" else "memory://ranges"
    assert _cases(open_backend(url)) == EXPECTED


@pytest.mark.s3
def test_ranges_of_s3_are_ranged_gets(s3_url: str) -> None:
    assert _cases(open_backend(s3_url)) == EXPECTED
