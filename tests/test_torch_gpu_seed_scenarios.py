"""The seed's GPU-only scenarios through a castore bucket: user Triton kernels, ``triton_op``, custom autograd
functions around them, and invalidation when a kernel's source changes.

These need CUDA and Triton: they are skipped on CI's CPU machine and run on the GPU machine
(`source benchmarks/gpu_env.sh; python3 -m pytest tests/test_torch_gpu_seed_scenarios.py`); the logs of its
runs are benchmarks/results/gpu-h100/ and gpu-h200/gpu_seed_scenarios.log.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (runs on the GPU machine, see benchmarks/gpu_env.sh)", allow_module_level=True)
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from torch._functorch import config as functorch_config  # noqa: E402

from test_torch_seed_scenarios import assert_aot, fleet, shared_headers  # noqa: E402,F401 - fixtures
from torch_scenarios import Fleet  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.s3, pytest.mark.gpu]
_op_serial = iter(range(1_000_000))


def _op_name() -> str:
    return f"castore_test::my_triton_op_{next(_op_serial)}"


def _make_triton_op(name: str, increment: int):  # noqa: ANN202
    """A user Triton kernel wrapped in a triton_op named ``name``; redefining it with increment 2 changes only the
    kernel's source, as the seed does."""

    if increment == 1:

        @triton.jit
        def my_jit(x):  # noqa: ANN001, ANN202
            arg_0 = tl.load(x)
            tl.store(x, arg_0 + 1)

    else:

        @triton.jit
        def my_jit(x):  # noqa: ANN001, ANN202
            arg_0 = tl.load(x)
            tl.store(x, arg_0 + 2)  # the changed source

    @torch._library.triton_op(name, mutates_args=())
    def my_triton_op(x: torch.Tensor) -> torch.Tensor:
        y = x.clone().detach_().requires_grad_(True)
        torch._library.capture_triton(my_jit)[1,](y)
        return y

    namespace, op = name.split("::")
    return getattr(getattr(torch.ops, namespace), op)


def _autograd_fn_around(op):  # noqa: ANN001, ANN202
    class MyAutogradFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            y = op(x) if op is not None else x.sin()
            ctx.save_for_backward(y)
            ctx.foo = x.cos()
            return y

        @staticmethod
        def backward(ctx, grad_output):  # noqa: ANN001, ANN205
            result = ctx.saved_tensors[0]
            return grad_output * result + ctx.foo * grad_output

    return lambda a: MyAutogradFunction.apply(a)


def _compile_on_a_then_hit_on_b(fleet: Fleet, fn) -> torch.Tensor:  # noqa: ANN001
    """Compile fn forward and backward on machine a (an AOTAutograd miss, saved to the bucket), then on a fresh
    machine b, where it must hit from the bucket. Returns a third input for the caller's next machine."""
    a = torch.randn(5, device="cuda", requires_grad=True)
    a2, a3 = (a.clone().detach_().requires_grad_(True) for _ in range(2))

    fleet.machine("a")
    compiled_fn = torch.compile(fn, backend="inductor")
    result = compiled_fn(a)
    torch.testing.assert_close(fn(a), result)
    result.sum().backward()
    assert_aot(miss=1, hit=0, saved=1)

    counters.clear()
    m = fleet.machine("b")
    result = compiled_fn(a2)
    torch.testing.assert_close(fn(a2), result)
    result.sum().backward()
    assert_aot(miss=0, hit=1, saved=0)
    assert m.hits("aot-autograd") == 1 and m.bucket_fetches() > 0
    return a3


@functorch_config.patch({"autograd_cache_allow_custom_autograd_functions": True})
def test_custom_autograd_function_hits_from_bucket(fleet: Fleet) -> None:
    _compile_on_a_then_hit_on_b(fleet, _autograd_fn_around(None))


@functorch_config.patch({"autograd_cache_allow_custom_autograd_functions": True})
def test_custom_autograd_function_with_user_triton_kernel_and_invalidation(fleet: Fleet) -> None:
    name = _op_name()
    fn = _autograd_fn_around(_make_triton_op(name, 1))
    a3 = _compile_on_a_then_hit_on_b(fleet, fn)

    # A kernel whose source changed must miss on a third machine, never load the old entry from the bucket.
    _make_triton_op(name, 2)  # same op name, new kernel source
    counters.clear()
    fleet.machine("c")
    compiled_fn = torch.compile(fn, backend="inductor")
    result = compiled_fn(a3)
    assert counters["aot_autograd"]["autograd_cache_miss"] == 1
    torch.testing.assert_close(fn(a3), result)


def test_triton_op_cache_invalidation(fleet: Fleet) -> None:
    name = _op_name()
    op = _make_triton_op(name, 1)
    a = torch.randn(5, device="cuda")
    a2, a3 = a.clone(), a.clone()

    def fn(x):  # noqa: ANN001, ANN202
        return op(x)

    fleet.machine("a")
    compiled = torch.compile(fn, backend="inductor")
    torch.testing.assert_close(fn(a), compiled(a))
    assert_aot(miss=1, hit=0, saved=1)

    m = fleet.machine("b")
    torch.testing.assert_close(fn(a2), compiled(a2))
    assert_aot(miss=1, hit=1, saved=1)
    assert m.hits("aot-autograd") == 1

    op = _make_triton_op(name, 2)  # same op name, new kernel source: fn now calls the redefined op
    fleet.machine("c")
    compiled = torch.compile(fn, backend="inductor")
    torch.testing.assert_close(fn(a3), compiled(a3))
    assert_aot(miss=2, hit=1, saved=2)
