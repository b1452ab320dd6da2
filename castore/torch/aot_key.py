"""The key of an ahead-of-time compiled function (castore.torch.precompiled): what decides what the compile
produced, in five components, each hashed on its own so that ``castore stat`` shows which one two keys differ in
(docs/TORCH.md, 'Ahead-of-time compiled functions')."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import marshal
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from castore.torch.bound_values import describe as describe_bound
from castore.torch.package_versions import package_version

KEY_PREFIX = "aot."
RECIPE = 3  # version of what the key covers, and of the artifact (2: guards on globals' values kept; 3: Dynamo's
# global state in the key, its thread count only where the compiled code depends on it, each submodule's class,
# closure and default values by content, hooks): a change misses every artifact written before
MAX_META_TEXT = 2000  # longest text of one manifest field
# Fingerprint fields left out of the key: the device index is part of each input's spec instead; the lists of
# changed settings name what the config hashes cover, and change once a compile has set settings to their defaults.
_FINGERPRINT_SKIP = ("gpu_index", "inductor_changed", "functorch_changed")


# -- the key ------------------------------------------------------------------------------------------------------
@dataclass
class AotKey:
    """The store key of one ahead-of-time compiled function, and what it covers (recorded in the manifest)."""

    key: str
    components: dict[str, str]  # component -> 16 hex digits of its SHA-256
    described: dict[str, str] = field(default_factory=dict)  # component -> short human-readable text
    threads_free: bool = False  # the compiled code runs alike at any torch.get_num_threads() (threads_free())


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _is_torch(module_name: str) -> bool:
    top = module_name.split(".", 1)[0]
    return top in ("torch", "torchgen", "functorch", "builtins", "abc", "typing", "collections", "enum")


@functools.cache
def _file_digest(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def _code_of(obj: Any) -> str:
    """What identifies one class's or function's code: its whole source file (helpers and constants beside it
    included) when there is one, else its own source, else its bytecode."""
    try:
        path = inspect.getsourcefile(obj)
    except TypeError:
        path = None
    if path:
        digest = _file_digest(path)
        if digest is not None:
            return f"file {os.path.basename(path)} sha256:{digest}"
    try:
        return "source sha256:" + _digest(inspect.getsource(obj))
    except (OSError, TypeError):
        pass
    codes = []
    functions = vars(obj).values() if isinstance(obj, type) else [obj]
    for value in functions:
        code = getattr(getattr(value, "__func__", value), "__code__", None)
        if code is not None:
            codes.append(marshal.dumps(code.co_code) + repr((code.co_consts, code.co_names)).encode())
    return "bytecode sha256:" + hashlib.sha256(b"\0".join(sorted(codes))).hexdigest()


def _classes_of(target: Any) -> list[type]:
    import torch

    roots: list[type] = []
    if isinstance(target, torch.nn.Module):
        roots = [type(m) for m in target.modules()]
    elif inspect.ismethod(target) and isinstance(target.__self__, torch.nn.Module):
        roots = [type(m) for m in target.__self__.modules()]
    seen: dict[type, None] = {}
    for cls in roots:
        for base in cls.__mro__:
            if not _is_torch(base.__module__ or ""):
                seen[base] = None
    return sorted(seen, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def _modules_of(target: Any) -> Iterable[Any]:
    import torch

    if isinstance(target, torch.nn.Module):
        return target.modules()
    if inspect.ismethod(target) and isinstance(target.__self__, torch.nn.Module):
        return target.__self__.modules()
    return ()


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def module_hooks(module: Any) -> list[Any]:
    """A module's own hooks, in the order they run."""
    return [hook for name in _HOOK_DICTS for hook in (getattr(module, name, None) or {}).values()]


def global_module_hooks() -> list[Any]:
    """The hooks registered for every module (``register_module_forward_hook`` and friends)."""
    from torch.nn.modules import module as module_module

    names = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks", "_global_backward_hooks")
    return [hook for name in names for hook in (getattr(module_module, name, None) or {}).values()]


def code_identity(target: Any) -> tuple[str, str]:
    """(text hashed into the key, short description): the code of a module's classes (every submodule's, and
    their bases outside torch; torch's own are its version, in the fingerprint), a forward set on an instance,
    or a function's code; and the versions of the packages that code comes from."""
    parts: list[str] = []
    packages: set[str] = set()
    names: list[str] = []
    functions: list[Any] = []
    for cls in _classes_of(target):
        names.append(f"{cls.__module__}.{cls.__qualname__}")
        parts.append(f"class {names[-1]}: {_code_of(cls)}")
        packages.add(cls.__module__.split(".", 1)[0])
    modules = list(_modules_of(target))
    for m in modules:
        if "forward" in vars(m):  # a forward assigned to the instance
            functions.append(vars(m)["forward"])
        functions.extend(module_hooks(m))  # traced inline through the module's __call__, with their closures
    if modules:
        functions.extend(global_module_hooks())
    if not isinstance(target, type) and not _classes_of(target):
        functions.append(target)
    for fn in functions:
        fn = inspect.unwrap(getattr(fn, "func", fn))  # functools.partial, decorators
        fn = getattr(fn, "__func__", fn)
        module = getattr(fn, "__module__", None) or ""
        name = f"{module}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
        names.append(name)
        parts.append(f"function {name}: {_code_of(fn)} {_bound_values(fn)}")
        if module and not _is_torch(module):
            packages.add(module.split(".", 1)[0])
    versions = sorted(v for v in (package_version(p) for p in packages if p not in ("__main__",)) if v)
    parts.append("packages " + " ".join(versions))
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return "\n".join(parts), shown + (f"; {', '.join(versions)}" if versions else "")


def _bound_values(fn: Any) -> str:
    """A function's closure cells and default values: the artifact carries the writer's (PyTorch pickles the closure
    and binds the stored signature's defaults), so a function made with other values is another key; what
    describe() cannot tell apart, the check before a load does (castore.torch.bound_values)."""
    cells = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            cells.append(describe_bound(cell.cell_contents))
        except ValueError:  # an empty cell
            cells.append("<empty>")
    defaults = [describe_bound(v) for v in getattr(fn, "__defaults__", None) or ()]
    kwdefaults = [f"{k}={describe_bound(v)}" for k, v in sorted((getattr(fn, "__kwdefaults__", None) or {}).items())]
    return f"closure({'; '.join(cells)}) defaults({'; '.join(defaults + kwdefaults)})"


def _dynamic_dims(t: Any) -> set[int]:
    dims: set[int] = set()
    for attr in ("_dynamo_dynamic_indices", "_dynamo_weak_dynamic_indices", "_dynamo_unbacked_indices"):
        dims |= set(getattr(t, attr, ()) or ())
    return dims


def _tensor_spec(t: Any, dynamic: bool | None) -> str:
    marked = _dynamic_dims(t)
    sizes = []
    for i, n in enumerate(t.shape):
        # A dynamic dimension is any size but 0 and 1, which Dynamo specializes on.
        sizes.append(str(n) if not (dynamic or i in marked) or n in (0, 1) else "s")
    if dynamic or marked:  # the stride order (the layout), not the strides of one size
        layout = ",".join(str(i) for i in sorted(range(t.dim()), key=lambda i: (-t.stride(i), i)))
    else:
        layout = ",".join(str(s) for s in t.stride())
    spec = f"{str(t.dtype).removeprefix('torch.')}[{','.join(sizes)}] stride({layout}) {t.device}"
    if t.requires_grad:
        spec += " grad"
    if marked:
        spec += f" dynamic{sorted(marked)}"
    return spec


def _value_spec(value: Any, dynamic: bool | None) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return _tensor_spec(value, dynamic)
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return f"{type(value).__name__} {value!r}"  # Dynamo specializes on these
    # An object passed in (a config, a function): Dynamo guards on what the trace read of it, so an input with
    # other values would load an artifact whose guards reject it; described, it is another key.
    return describe_bound(value)


def input_specs(args: tuple[Any, ...], kwargs: dict[str, Any], dynamic: bool | None) -> str:
    """The inputs as the key sees them: each leaf's shape (dynamic sizes as s), strides, dtype, device and
    requires_grad, or a constant's value, in pytree order."""
    from torch.utils import _pytree as pytree

    leaves, spec = pytree.tree_flatten((args, kwargs))
    return "\n".join([" ".join(str(spec).split()), *(_value_spec(v, dynamic) for v in leaves)])


def parameter_specs(target: Any) -> str:
    import torch

    module = target if isinstance(target, torch.nn.Module) else getattr(target, "__self__", None)
    if not isinstance(module, torch.nn.Module):
        return ""
    lines = [f"param {n} {_tensor_spec(p, False)}" for n, p in module.named_parameters(remove_duplicate=False)]
    lines += [f"buffer {n} {_tensor_spec(b, False)}" for n, b in module.named_buffers(remove_duplicate=False)]
    lines.append("training " + "".join("1" if m.training else "0" for m in module.modules()))
    for prefix, m in module.named_modules(remove_duplicate=False):
        # Each submodule's class by name, torch's own too (the code component hashes only the others' code):
        # Sequential(Linear, Tanh) and Sequential(Linear, Sigmoid) have the same parameters.
        lines.append(f"module {prefix or '.'} {type(m).__module__}.{type(m).__qualname__}")
        # Attributes the forward may read (a scale, a flag, an activation function, a list of sizes): Dynamo
        # guards on what it reads of them, so a module with other values would load an artifact its guards reject.
        for attr, value in sorted(vars(m).items()):
            if not attr.startswith("_") and attr != "training":
                lines.append(f"attr {prefix}.{attr} {_attribute_spec(value)}")
    return "\n".join(lines)


def _attribute_spec(value: Any, depth: int = 0) -> str:
    """A module attribute as the key sees it: scalars by value, tensors by spec (read at each call), functions as
    closure values are, short containers item by item; any other object by its type alone (a config object may
    hold paths or times of the machine that made it, which must not split the key)."""
    import torch

    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, torch.Tensor):
        return _tensor_spec(value, False)
    if isinstance(value, (list, tuple)) and depth < 2 and len(value) <= 64:
        return f"{type(value).__qualname__}[" + ", ".join(_attribute_spec(v, depth + 1) for v in value) + "]"
    if isinstance(value, dict) and depth < 2 and len(value) <= 64 and all(isinstance(k, str) for k in value):
        return "{" + ", ".join(f"{k!r}: {_attribute_spec(v, depth + 1)}" for k, v in sorted(value.items())) + "}"
    if inspect.isfunction(value) or inspect.isbuiltin(value) or isinstance(value, functools.partial):
        return describe_bound(value)
    return type(value).__qualname__


def _stable(value: Any) -> str:
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__qualname__)}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_stable(v)}" for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))) + "}"
    return repr(value)


def threads_free(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any] | None) -> bool:
    """Whether the compiled code runs alike at any thread count. Inductor's C++ kernels are generated for
    ``torch.get_num_threads()`` (an OpenMP thread count written into them) unless ``cpp.threads`` fixes the count or
    ``cpp.dynamic_threads`` reads it at run time; a graph whose inputs, parameters and buffers all live on an
    accelerator gets Triton kernels, which do not depend on it. Dynamo's global-state guard checks the count all
    the same: where this is true castore checks that state itself, the count left out (PrecompiledFunction), so
    that a function prewarmed on a 32-core CI runner loads in a torchrun worker with OMP_NUM_THREADS=1."""
    import torch
    from torch.utils import _pytree as pytree

    from castore.torch.fingerprint import config_value

    opts = options or {}
    threads = opts.get("cpp.threads", config_value("torch._inductor.config", "cpp.threads"))
    dynamic_threads = opts.get("cpp.dynamic_threads", config_value("torch._inductor.config", "cpp.dynamic_threads"))
    if (isinstance(threads, int) and threads >= 1) or dynamic_threads is True:
        return True
    module = target if isinstance(target, torch.nn.Module) else getattr(target, "__self__", None)
    tensors = [v for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)]
    if isinstance(module, torch.nn.Module):
        tensors += [*module.parameters(), *module.buffers()]
    return bool(tensors) and all(t.device.type not in ("cpu", "meta") for t in tensors)


def dynamo_global_state(free_threads: bool, guard: Any = None) -> dict[str, Any]:
    """What Dynamo's global-state guard compares (grad mode, autocast, TF32 and reduced-precision matmul flags,
    deterministic algorithms, the default dtype, torch-function state, the thread count), now or as ``guard``
    (a GlobalStateGuard) recorded it, the thread count left out where free_threads. Empty where this torch has
    no such guard."""
    try:
        if guard is None:
            from torch._C._dynamo.guards import GlobalStateGuard

            guard = GlobalStateGuard()
        state = json.loads(guard.__getstate__())
    except Exception:  # noqa: BLE001 - another torch: the fields global_state() names still count
        return {}
    if free_threads:
        state.pop("num_threads", None)
    return state


def global_state(dynamic: bool | None, options: dict[str, Any] | None, entry: str = "",
                 free_threads: bool = False) -> str:  # fmt: skip
    """What Dynamo's global-state guard checks, the compile settings and how the target is entered (AotPlan)."""
    import torch

    state = {
        "guarded": dynamo_global_state(free_threads),
        "entry": entry,
        "grad": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "default_dtype": str(torch.get_default_dtype()),
        "dynamic": dynamic,
        "options": _stable(options or {}),
        "backend": "inductor",
    }
    for device in ("cpu", "cuda"):
        try:
            state[f"autocast.{device}"] = torch.is_autocast_enabled(device)
        except TypeError:  # an older torch: is_autocast_enabled() is CUDA's
            state["autocast.cuda"] = torch.is_autocast_enabled()
    return json.dumps(state, sort_keys=True)


def environment() -> str:
    """The environment fingerprint (castore.torch.fingerprint), without the device index."""
    from castore.torch import fingerprint as fingerprint_module

    fp = fingerprint_module.fingerprint()
    return json.dumps({k: v for k, v in fp.items() if k not in _FINGERPRINT_SKIP}, sort_keys=True, default=repr)


def compute_key(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *, dynamic: bool | None = None,
                options: dict[str, Any] | None = None, entry: str = "") -> AotKey:  # fmt: skip
    """The key of target compiled ahead of time for these inputs and settings; entry: how it is entered
    (castore.torch.precompiled.plan_for)."""
    code, code_shown = code_identity(target)
    inputs = input_specs(args, kwargs, dynamic)
    free = threads_free(target, args, kwargs, options)
    components = {
        "code": code,
        "inputs": inputs,
        "parameters": parameter_specs(target),
        "settings": global_state(dynamic, options, entry, free),
        "environment": environment(),
    }
    digests = {name: _digest(text)[:16] for name, text in components.items()}
    whole = _digest(f"castore aot recipe {RECIPE}\n" + "\n".join(f"{n}\0{components[n]}" for n in sorted(components)))
    described = {
        "code": code_shown,
        "inputs": "; ".join(inputs.splitlines()[1:])[:MAX_META_TEXT],
        "settings": components["settings"][:MAX_META_TEXT],
    }
    return AotKey(KEY_PREFIX + whole, digests, described, threads_free=free)
