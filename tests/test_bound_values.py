"""The values a function carries (closure cells, defaults) as the ahead-of-time key describes them and as the check
before a load compares them with the stored ones (castore.torch.bound_values)."""

from __future__ import annotations

import functools
import pickle

import pytest

torch = pytest.importorskip("torch")

from castore.torch.bound_values import describe, same  # noqa: E402

pytestmark = pytest.mark.torch


class Slotted:
    __slots__ = ("k",)

    def __init__(self, k: float) -> None:
        self.k = k


class Plain:
    def __init__(self, k: float, inner: object = None) -> None:
        self.k = k
        self.inner = inner

    def scale(self, x: float) -> float:
        return x * self.k


def _pairs() -> list[tuple[object, object]]:
    """(value, another value a function could close over instead): each pair must be told apart."""
    return [
        (torch.ones(3), torch.tensor([1.0, 1.0, 2.0])),
        (torch.ones(3), torch.ones(3, dtype=torch.float64)),
        (torch.relu, torch.sigmoid),
        (functools.partial(torch.clamp, min=0.0), functools.partial(torch.clamp, min=1.0)),
        (Plain(1.0).scale, Plain(2.0).scale),
        (Slotted(1.0), Slotted(2.0)),
        (Plain(1.0, Plain(2.0)), Plain(1.0, Plain(3.0))),
        ([1, 2, (3.0, "a")], [1, 2, (3.0, "b")]),
        ({"a": torch.zeros(2)}, {"a": torch.ones(2)}),
        ((lambda x: x + 1), (lambda x: x + 2)),
    ]


def test_values_that_compute_otherwise_are_described_and_compared_apart() -> None:
    for mine, other in _pairs():
        assert describe(mine) != describe(other), (mine, other)
        assert not same(mine, other), (mine, other)


def test_a_value_and_its_pickled_copy_are_the_same() -> None:
    # What a reader finds in the artifact: the writer's value, unpickled (lambdas travel by code in PyTorch's pickler).
    for mine, _ in _pairs():
        if getattr(mine, "__name__", "") == "<lambda>":
            continue
        copy = pickle.loads(pickle.dumps(mine))
        assert same(mine, copy), mine
        assert describe(mine) == describe(copy), mine
    nan = torch.tensor([float("nan"), 1.0])
    assert same(nan, nan.clone())  # by bytes: a NaN equals itself


def test_what_the_key_describes_by_type_or_size_alone_is_still_compared() -> None:
    long_a, long_b = [0.0] * 20_000, [0.0] * 20_000
    long_b[-1] = 1.0
    assert describe(long_a) == describe(long_b)  # the key: by length
    assert same(long_a, list(long_a)) and not same(long_a, long_b)
    assert not same(object(), object())  # no value of its own: never taken for another
