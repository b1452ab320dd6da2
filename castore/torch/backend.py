"""``torch.compile(model, backend="castore")``: Inductor with castore installed first.

Registered through PyTorch's ``torch_dynamo_backends`` entry point (pyproject.toml). torch.compile hands a named
backend other than "inductor" only ``mode`` and ``options`` (and only when set); this backend gives them, with
the ``dynamic`` Dynamo was asked for, to PyTorch's own Inductor wrapper, so it accepts exactly what
``backend="inductor"`` accepts, with the same checks and the same config patches.
"""

from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()
_wrappers: list[Any] = []  # distinct Inductor wrappers used so far, for reset()


def castore_backend(
    gm: Any, example_inputs: Any, *, mode: str | None = None, options: dict[str, Any] | None = None
) -> Any:
    import castore.torch

    castore.torch.install()  # idempotent; configured from CASTORE_* / castore.toml
    return _inductor(mode, options)(gm, example_inputs)


def _inductor(mode: str | None, options: dict[str, Any] | None) -> Any:
    import torch

    wrapper = torch._TorchCompileInductorWrapper(mode, options, _dynamic())
    with _lock:
        for known in _wrappers:
            if known == wrapper:
                return known
        _wrappers.append(wrapper)
    return wrapper


def _dynamic() -> bool | None:
    """torch.compile's ``dynamic`` as Dynamo applied it (eval_frame.make_set_enable_dynamic): True, False or None."""
    from torch._dynamo import config

    if not config.assume_static_by_default:
        return True
    if not config.automatic_dynamic_shapes:
        return False
    return None


def _reset() -> None:
    """torch._dynamo.reset() calls the backend's reset: Inductor's resets CUDA graph trees (mode="reduce-overhead")."""
    with _lock:
        wrappers = list(_wrappers)
    for wrapper in wrappers:
        wrapper.reset()


castore_backend.reset = _reset  # type: ignore[attr-defined]
