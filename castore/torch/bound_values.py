"""The values a function carries with it (closure cells, argument defaults), which an ahead-of-time compiled function
carries too: PyTorch pickles the writer's closure into the artifact and binds the writer's defaults from the stored
signature, so a reader whose function closes over another tensor, another op or another default would compute with
the writer's. The key describes these values (``describe``); before a loaded function is used, its stored values are
compared with the reader's (``first_difference``), so that what the key cannot describe is never served stale.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from typing import Any

MAX_DEPTH = 4  # nesting followed into containers, functions and plain objects
MAX_ITEMS = 10_000  # longest container the key describes item by item


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', None) or ''}.{getattr(obj, '__qualname__', None) or type(obj).__qualname__}"


def _tensor_digest(t: Any) -> str:
    import torch

    data = t.detach()
    if data.layout != torch.strided or data.is_quantized or data.is_meta:
        return f"<{data.layout} tensor>"
    data = data.to("cpu").contiguous()
    return hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:32]


def describe(value: Any, depth: int = 0) -> str:
    """A value as the key sees it: scalars by value, tensors by spec and content digest, functions by name, code and
    their own bound values, containers and plain objects item by item; what cannot be described, by type."""
    import torch

    if depth > MAX_DEPTH:
        return f"<{type(value).__qualname__}>"
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
        return f"{type(value).__name__} {value!r}"
    if isinstance(value, torch.Tensor):
        return f"tensor {value.dtype} {tuple(value.shape)} {value.device} grad={value.requires_grad} {_tensor_digest(value)}"
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_ITEMS:
            return f"{type(value).__qualname__} of {len(value)}"
        return f"{type(value).__qualname__}[" + ", ".join(describe(v, depth + 1) for v in value) + "]"
    if isinstance(value, dict):
        if len(value) > MAX_ITEMS:
            return f"dict of {len(value)}"
        items = sorted(value.items(), key=lambda kv: repr(kv[0]))
        return "{" + ", ".join(f"{k!r}: {describe(v, depth + 1)}" for k, v in items) + "}"
    if isinstance(value, functools.partial):
        return f"partial({describe(value.func, depth + 1)}, {describe(value.args, depth + 1)}, {describe(value.keywords, depth + 1)})"
    if inspect.ismethod(value):
        return f"method {describe(value.__func__, depth + 1)} of {describe(value.__self__, depth + 1)}"
    if inspect.isfunction(value):
        code = value.__code__
        bound = [describe(c.cell_contents, depth + 1) if _filled(c) else "<empty>" for c in value.__closure__ or ()]
        defaults = [describe(v, depth + 1) for v in value.__defaults__ or ()]
        code_digest = hashlib.sha256(code.co_code + repr((code.co_consts, code.co_names)).encode()).hexdigest()[:16]
        return f"function {_qualified(value)} code:{code_digest} closure({'; '.join(bound)}) defaults({'; '.join(defaults)})"
    if callable(value) and hasattr(value, "__qualname__"):  # builtins, torch ops, classes
        return f"{type(value).__qualname__} {_qualified(value)}"
    if isinstance(value, torch.nn.Module):
        return f"module {_qualified(type(value))}"  # not serializable in a closure: the compile falls back
    fields = _fields(value)
    if fields is not None:
        return f"{_qualified(type(value))}" + describe(fields, depth + 1)
    return f"<{_qualified(type(value))}>"


def _fields(value: Any) -> dict[str, Any] | None:
    """A plain object's attributes (its __dict__ and __slots__), or None for one that has neither."""
    slots = [n for cls in type(value).__mro__ for n in getattr(cls, "__slots__", ()) if isinstance(n, str)]
    fields = dict(getattr(value, "__dict__", None) or {})
    for name in slots:
        if name not in ("__dict__", "__weakref__") and hasattr(value, name):
            fields[name] = getattr(value, name)
    return fields if fields or slots or hasattr(value, "__dict__") else None


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def same(a: Any, b: Any, depth: int = 0) -> bool:
    """Whether a reader's value is the writer's (b unpickled from the artifact): by value where there is one."""
    import torch

    if a is b:
        return True
    if depth > MAX_DEPTH or type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        if (a.dtype, a.shape, a.device.type, a.requires_grad) != (b.dtype, b.shape, b.device.type, b.requires_grad):
            return False
        return _tensor_digest(a) == _tensor_digest(b)  # bytes alike: NaNs included
    if isinstance(a, (list, tuple)):  # item by item, however long (the key describes long ones by length)
        return len(a) == len(b) and all(same(x, y, depth + 1) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k], depth + 1) for k in a)
    if isinstance(a, functools.partial):
        return same((a.func, a.args, a.keywords), (b.func, b.args, b.keywords), depth + 1)
    if inspect.ismethod(a):
        return same(a.__func__, b.__func__, depth + 1) and same(a.__self__, b.__self__, depth + 1)
    if inspect.isfunction(a):
        return describe(a, depth) == describe(b, depth)
    if callable(a) and hasattr(a, "__qualname__"):
        return _qualified(a) == _qualified(b)
    fields = _fields(a)
    if fields is not None and type(a).__eq__ is object.__eq__:  # compared by identity: by attributes instead
        return same(fields, _fields(b), depth + 1)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - a value that cannot say: not the same
        return False


def _defaults(signature: inspect.Signature) -> dict[str, Any]:
    return {n: p.default for n, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}


def first_difference(fn: Any, compiled: Any) -> str | None:
    """Where the values the loaded function carries (PyTorch's stored closure and signature) differ from those of
    fn, the reader's function; None when all match. A function whose values cannot be read on either side
    differs, unless it carries none."""
    fn = getattr(fn, "__func__", fn)
    artifacts = getattr(compiled, "_artifacts", None)
    env = getattr(artifacts, "runtime_env", None)
    mine = getattr(fn, "__closure__", None) or ()
    if env is None or not hasattr(env, "closure"):
        return "the stored closure cannot be read" if mine else None
    stored = env.closure or ()
    names = getattr(getattr(fn, "__code__", None), "co_freevars", ())
    if len(stored) != len(mine):
        return f"closure of {len(stored)} values, this function's of {len(mine)}"
    for i, (theirs, ours) in enumerate(zip(stored, mine)):
        name = names[i] if i < len(names) else str(i)
        if _filled(theirs) != _filled(ours) or (_filled(ours) and not same(ours.cell_contents, theirs.cell_contents)):
            return f"closure value {name!r}"
    signature = getattr(artifacts, "signature", None)
    if isinstance(signature, inspect.Signature) and inspect.isfunction(fn):
        try:
            ours_defaults = _defaults(inspect.signature(fn))
        except (TypeError, ValueError):
            return "this function's signature cannot be read"
        theirs_defaults = _defaults(signature)
        if ours_defaults.keys() != theirs_defaults.keys():
            return "the arguments with defaults"
        for name, value in ours_defaults.items():
            if not same(value, theirs_defaults[name]):
                return f"default of {name!r}"
    return None
