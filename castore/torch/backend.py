"""``torch.compile(model, backend="castore")``: Inductor with castore installed first.

Registered through PyTorch's ``torch_dynamo_backends`` entry point (pyproject.toml).
"""

from __future__ import annotations

from typing import Any


def castore_backend(gm: Any, example_inputs: Any, **kwargs: Any) -> Any:
    import castore.torch

    castore.torch.install()  # idempotent; configured from CASTORE_* / castore.toml
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, **kwargs)
