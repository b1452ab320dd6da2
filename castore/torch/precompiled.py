"""Ahead-of-time compiled functions served from the store: a fresh machine skips Dynamo, not only Inductor.

    import castore.torch
    compiled = castore.torch.aot_compile(model, (x,))      # under torch.no_grad() for inference
    out = compiled(x)

PyTorch's ``torch.compile(fn, fullgraph=True).aot_compile((args, kwargs))`` traces and compiles once and returns a
function whose serialized form holds the traced bytecode, the guards and the compiled graph (Inductor's output
with its AOTAutograd wrapper, backward included). Loading it (``torch.compiler.load_compiled_function``) runs no
Dynamo trace and no graph compile; the C++ kernels it links are fetched from the store's ``cpp-kernel`` cache.

castore stores that artifact under a key over everything that decides what the compile produced (docs/TORCH.md,
'Ahead-of-time compiled functions'): the code, the inputs' specs, the parameters' specs, the global state and the
environment fingerprint. Before a stored artifact is loaded, the sources Dynamo traced are checked against the
code this process runs, so that a helper function changed outside the key's files is never served stale. Where
a function cannot be compiled ahead of time or serialized, castore falls back to ``torch.compile`` (served from
castore's caches as usual) with one log line, and records that in the store so that the next machine does not try
again. A store failure never breaks compilation: it is a miss.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import io
import json
import logging
import marshal
import os
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("castore.torch")

CACHE = "aot-function"  # castore's cache name (`castore stats`) and the manifests' `artifact`
KEY_PREFIX = "aot."
RECIPE = 1  # version of what the key covers: a change misses every artifact written before
MAGIC = b"castore-aot-function\n"
VALUE_FORMAT = 1
MAX_HEADER = 16 << 20
MAX_META_TEXT = 2000
# What torch's own default guard filter for aot_compile drops besides globals (CheckFunctionManager's list).
_UNSERIALIZABLE_GUARDS = ("DICT_VERSION", "NN_MODULE", "ID_MATCH", "FUNCTION_MATCH", "CLASS_MATCH", "MODULE_MATCH",
                          "CLOSURE_MATCH", "WEAKREF_ALIVE")  # fmt: skip
# Fingerprint fields left out of the key: the device index is part of each input's spec instead; the lists of
# changed settings name what the config hashes cover, and change once a compile has set settings to their defaults.
_FINGERPRINT_SKIP = ("gpu_index", "inductor_changed", "functorch_changed")


class AotUnavailable(Exception):
    """This torch cannot compile ahead of time (no ``aot_compile``), or this target cannot be (a graph break,
    an unserializable guard or object): the caller falls back to torch.compile."""


# -- the key ------------------------------------------------------------------------------------------------------
@dataclass
class AotKey:
    """The store key of one ahead-of-time compiled function, and what it covers (recorded in the manifest)."""

    key: str
    components: dict[str, str]  # component -> 16 hex digits of its SHA-256
    described: dict[str, str] = field(default_factory=dict)  # component -> short human-readable text


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


@functools.cache
def _package_version(top: str) -> str | None:
    """The installed distribution of a top-level package, as NAME==VERSION (None for code outside any)."""
    from importlib import metadata

    try:
        return f"{top}=={metadata.version(top)}"
    except metadata.PackageNotFoundError:
        pass
    except Exception:  # noqa: BLE001 - broken metadata: the file digests still cover the code
        return None
    names = _packages_distributions().get(top) or []
    found = []
    for name in sorted(set(names)):
        try:
            found.append(f"{name}=={metadata.version(name)}")
        except Exception:  # noqa: BLE001, PERF203
            continue
    return ",".join(found) or None


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    from importlib import metadata

    try:
        return dict(metadata.packages_distributions())
    except Exception:  # noqa: BLE001
        return {}


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
    for m in _modules_of(target):
        if "forward" in vars(m):  # a forward assigned to the instance
            functions.append(vars(m)["forward"])
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
    versions = sorted(v for v in (_package_version(p) for p in packages if p not in ("__main__",)) if v)
    parts.append("packages " + " ".join(versions))
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return "\n".join(parts), shown + (f"; {', '.join(versions)}" if versions else "")


def _bound_values(fn: Any) -> str:
    """A function's closure cells and default values: Dynamo bakes them into the graph (their guards are among
    those dropped), so a function made with other values is another key."""
    cells = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            cells.append(_value_spec(cell.cell_contents, None))
        except ValueError:  # an empty cell
            cells.append("<empty>")
    defaults = [_value_spec(v, None) for v in getattr(fn, "__defaults__", None) or ()]
    kwdefaults = [f"{k}={_value_spec(v, None)}" for k, v in sorted((getattr(fn, "__kwdefaults__", None) or {}).items())]
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
    return type(value).__qualname__


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
        # Plain attributes the forward may read (a scale, a flag): Dynamo guards on them as constants.
        for attr, value in sorted(vars(m).items()):
            if not attr.startswith("_") and attr != "training" and (value is None or isinstance(value, (bool, int, float, str))):
                lines.append(f"attr {prefix}.{attr} {value!r}")
    return "\n".join(lines)


def _stable(value: Any) -> str:
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__qualname__)}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_stable(v)}" for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))) + "}"
    return repr(value)


def global_state(dynamic: bool | None, options: dict[str, Any] | None, entry: str = "") -> str:
    """What Dynamo's global-state guard checks, the compile settings and how the target is entered (AotPlan)."""
    import torch

    state = {
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
                options: dict[str, Any] | None = None) -> AotKey:  # fmt: skip
    code, code_shown = code_identity(target)
    inputs = input_specs(args, kwargs, dynamic)
    components = {
        "code": code,
        "inputs": inputs,
        "parameters": parameter_specs(target),
        "settings": global_state(dynamic, options, plan_for(target).entry),
        "environment": environment(),
    }
    digests = {name: _digest(text)[:16] for name, text in components.items()}
    whole = _digest(f"castore aot recipe {RECIPE}\n" + "\n".join(f"{n}\0{components[n]}" for n in sorted(components)))
    described = {
        "code": code_shown,
        "inputs": "; ".join(inputs.splitlines()[1:])[:MAX_META_TEXT],
        "settings": components["settings"][:MAX_META_TEXT],
    }
    return AotKey(KEY_PREFIX + whole, digests, described)


# -- the stored value ---------------------------------------------------------------------------------------------
# MAGIC, a 4-byte big-endian header length, the JSON header, then PyTorch's serialized function (empty for a
# target recorded as not serializable).
def encode_value(header: dict[str, Any], payload: bytes) -> bytes:
    raw = json.dumps({"v": VALUE_FORMAT, **header}, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(raw)) + raw + payload


def decode_value(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, payload); ValueError for bytes that are not a value of this format."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise ValueError("not a castore ahead-of-time function")
    (length,) = struct.unpack_from(">I", data, len(MAGIC))
    start = len(MAGIC) + 4
    if length > MAX_HEADER or start + length > len(data):
        raise ValueError("truncated header")
    header = json.loads(data[start : start + length])
    if not isinstance(header, dict) or header.get("v") != VALUE_FORMAT:
        raise ValueError(f"value format {header.get('v') if isinstance(header, dict) else '?'} is not {VALUE_FORMAT}")
    return header, data[start + length :]


def _module_lines(name: str) -> list[str] | None:
    module = sys.modules.get(name)
    if module is None:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - gone or broken: the artifact cannot be checked
            return None
    try:
        return inspect.getsource(module).splitlines(keepends=True)
    except (OSError, TypeError):
        return None


def traced_sources(compiled: Any) -> list[list[Any]]:
    """[module, first line, last line, SHA-256 of those lines] for every function Dynamo traced, read from this
    process's code (what the artifact was compiled from)."""
    info = compiled.source_info() if hasattr(compiled, "source_info") else getattr(getattr(compiled, "_artifacts", None), "source_info", None)
    out = []
    for src in sorted(getattr(info, "inlined_sources", ()) or (), key=lambda s: (s.module, s.firstlineno)):
        lines = _module_lines(src.module)
        if lines is None:
            continue
        out.append([src.module, src.firstlineno, src.lastlineno, _digest("".join(lines[src.firstlineno - 1 : src.lastlineno - 1]))])
    return out


def stale_source(sources: list[list[Any]]) -> str | None:
    """The first traced function whose code differs here from the writer's, or None when all match."""
    cache: dict[str, list[str] | None] = {}
    for module, first, last, digest in sources:
        if module not in cache:
            cache[module] = _module_lines(str(module))
        lines = cache[module]
        if lines is None or _digest("".join(lines[int(first) - 1 : int(last) - 1])) != digest:
            return f"{module} lines {first}-{last} changed"
    return None


# -- guards -------------------------------------------------------------------------------------------------------
@dataclass
class GuardRecord:
    """Which of Dynamo's guards the artifact keeps and which it drops (they cannot be serialized, or refer to
    globals, which are this process's objects)."""

    kept: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    dropped_names: list[str] = field(default_factory=list)

    def filter(self, user_filter: Callable[[Any], Any] | None) -> Callable[[Any], list[bool]]:
        def guard_filter(entries: Any) -> list[bool]:
            if user_filter is not None:
                keep = [bool(k) for k in user_filter(entries)]
            else:  # torch's own default for aot_compile
                keep = [not (g.is_global or g.guard_type in _unserializable_guard_types()) for g in entries]
            self.kept.clear(), self.dropped.clear(), self.dropped_names.clear()
            for g, k in zip(entries, keep):
                if k:
                    self.kept[g.guard_type] += 1
                else:
                    self.dropped[g.guard_type] += 1
                    self.dropped_names.append(f"{g.guard_type} {g.name}")
            return keep

        return guard_filter

    def to_header(self) -> dict[str, Any]:
        return {"kept": dict(self.kept), "dropped": dict(self.dropped), "dropped_names": self.dropped_names[:200]}

    @staticmethod
    def text(counts: dict[str, int]) -> str:
        return ", ".join(f"{name} {n}" for name, n in sorted(counts.items())) or "none"


def _unserializable_guard_types() -> tuple[str, ...]:
    try:
        from torch._dynamo.guards import CheckFunctionManager

        return tuple(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)
    except Exception:  # noqa: BLE001 - another torch: its list as of 2.13
        return _UNSERIALIZABLE_GUARDS


# -- compiling, saving, loading -----------------------------------------------------------------------------------
@dataclass
class AotPlan:
    """How a target is compiled ahead of time: the function torch.compile wraps, the module passed as its first
    argument at each call (PyTorch's compiled function of a method takes ``self`` explicitly), and the objects
    its serialized form refers to without holding them (passed again at load)."""

    fn: Any
    self_arg: Any = None
    external: dict[str, Any] = field(default_factory=dict)
    entry: str = "function"  # "forward" (the module's forward, unbound), "__call__" (hooks included), "function"


def _has_hooks(module: Any) -> bool:
    from torch.nn.modules import module as module_module

    own = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    shared = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks")
    return any(getattr(module, name, None) for name in own) or any(getattr(module_module, n, None) for n in shared)


def plan_for(target: Any) -> AotPlan:
    """A module without hooks is compiled through its class's forward with the module as an argument: the artifact
    refers to no module, and each call reads this process's parameters (every torch with aot_compile serializes
    that alike). A module with hooks is compiled through its __call__, which refers to the module: only where
    PyTorch can keep it out of the artifact (``external_data``, torch 2.13) instead of pickling it, weights and
    all."""
    import torch

    if inspect.ismethod(target) and isinstance(target.__self__, torch.nn.Module):
        return AotPlan(target.__func__, target.__self__, entry="method")
    if not isinstance(target, torch.nn.Module):
        return AotPlan(target)
    forward = vars(target).get("forward")
    if forward is None and not _has_hooks(target):
        return AotPlan(type(target).forward, target, entry="forward")
    return AotPlan(target, target, {"model": target}, entry="__call__")


def _takes(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def compile_ahead(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *, dynamic: bool | None,
                  options: dict[str, Any] | None, guards: GuardRecord) -> tuple[Any, bytes]:  # fmt: skip
    """(the compiled function, its serialized bytes). Raises AotUnavailable where this torch has no aot_compile,
    and whatever torch raises for a target it cannot compile or serialize."""
    import torch

    plan = plan_for(target)
    serializer = _serializer()
    if plan.external and (serializer is None or not _takes(serializer, "external_data")):
        raise AotUnavailable(f"torch {torch.__version__} would pickle the module into the artifact (a module with hooks "
                             "needs torch.compile's external_data)")  # fmt: skip
    opts = dict(options or {})
    opts["guard_filter_fn"] = guards.filter(opts.pop("guard_filter_fn", None))
    config = torch._dynamo.config
    patch = config.patch(enable_aot_compile=True) if hasattr(config, "enable_aot_compile") else contextlib.nullcontext()
    with patch:
        compiled_obj = torch.compile(plan.fn, fullgraph=True, dynamic=dynamic, options=opts)
        entry = compiled_obj.forward if isinstance(plan.fn, torch.nn.Module) else compiled_obj
        aot = getattr(entry, "aot_compile", None)
        if aot is None:
            raise AotUnavailable(f"torch {torch.__version__} has no torch.compile(...).aot_compile")
        call_args = tuple(args) if plan.self_arg is None or plan.entry == "__call__" else (plan.self_arg, *args)
        compiled = _trace_with_restarts(aot, (call_args, dict(kwargs)))
    serialize = getattr(type(compiled), "serialize", None)
    if serialize is None:
        raise AotUnavailable(f"torch {torch.__version__}'s compiled function has no serialize()")
    result = serialize(compiled, plan.external or None) if _takes(serialize, "external_data") else serialize(compiled)
    payload = result if isinstance(result, (bytes, bytearray)) else result.serialized_data
    return compiled, bytes(payload)


AOT_RESTARTS = 8  # as Dynamo's own compile loop: each restart records what the next attempt must do differently


def _trace_with_restarts(aot: Callable[[Any], Any], inputs: Any) -> Any:
    """aot(inputs), traced again where Dynamo asks to restart its analysis (a Python float turned into a tensor
    with dynamic shapes, say): torch.compile's own loop does this, aot_compile raises it to the caller."""
    try:
        from torch._dynamo.exc import RestartAnalysis
    except ImportError:  # noqa: BLE001 - a torch without it raises nothing of the kind
        return aot(inputs)
    for _ in range(AOT_RESTARTS):
        try:
            return aot(inputs)
        except RestartAnalysis as exc:
            log.debug("castore: ahead-of-time trace restarted: %s", type(exc).__name__)
    return aot(inputs)


def _serializer() -> Any:
    try:
        from torch._dynamo.aot_compile import AOTCompiledFunction

        return AOTCompiledFunction.serialize
    except Exception:  # noqa: BLE001 - checked again on the compiled function's own type
        return None


def load_payload(target: Any, payload: bytes) -> Any:
    """PyTorch's compiled function from verified bytes, in memory (nothing is written to disk but the kernels
    Inductor loads, which castore serves from the store)."""
    import torch

    plan = plan_for(target)
    load = getattr(torch.compiler, "load_compiled_function", None)
    if load is None:
        raise AotUnavailable(f"torch {torch.__version__} has no torch.compiler.load_compiled_function")
    return load(io.BytesIO(payload), **({"external_data": plan.external} if plan.external else {}))


def describe_target(target: Any) -> str:
    obj = type(target) if not (inspect.isfunction(target) or inspect.ismethod(target)) else target
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


# -- the API ------------------------------------------------------------------------------------------------------
class PrecompiledFunction:
    """What :func:`aot_compile` returns: call it as the target (a module: with its forward's arguments).

    ``source`` says where the compiled function came from: ``"store"`` (loaded; nothing traced or compiled),
    ``"compiled"`` (compiled here and published) or ``"fallback"`` (torch.compile; ``reason`` says why). Inputs
    that the artifact's guards reject (another shape, grad mode) are run through torch.compile, with one log line.
    """

    def __init__(self, target: Any, key: AotKey | None, source: str, compiled: Any = None, *, reason: str | None = None,
                 guards: dict[str, Any] | None = None, dynamic: bool | None = None,
                 options: dict[str, Any] | None = None, seconds: float = 0.0) -> None:  # fmt: skip
        self.target = target
        self.key = key.key if key is not None else None
        self.key_components = dict(key.components) if key is not None else {}
        self.source = source
        self.reason = reason
        self.guards = guards or {}
        self.seconds = seconds  # spent in aot_compile: key, lookup, load or compile
        self._compiled = compiled
        self._dynamic = dynamic
        self._options = options
        self._fallback: Any = None
        self._fallback_lock = threading.Lock()
        self._checks_guards = False
        self._self_arg = plan_for(target).self_arg
        if compiled is not None and hasattr(compiled, "guard_check") and hasattr(compiled, "disable_guard_check"):
            compiled.disable_guard_check()  # checked here instead, to run torch.compile on a mismatch
            self._checks_guards = True

    def _torch_compiled(self) -> Any:
        with self._fallback_lock:
            if self._fallback is None:
                import torch

                self._fallback = torch.compile(self.target, dynamic=self._dynamic, options=self._options)
            return self._fallback

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        compiled = self._compiled
        if compiled is None:
            return self._torch_compiled()(*args, **kwargs)
        # A module's compiled __call__ takes the module as its first argument (PyTorch's signature is the unbound
        # method's): the module of this process, whose parameters the graph reads at each call.
        full = (self._self_arg, *args) if self._self_arg is not None else args
        if self._checks_guards and not compiled.guard_check(*full, **kwargs):
            self._compiled = None
            log.info("castore: %s: the ahead-of-time compiled function's guards reject these inputs (%s); using "
                     "torch.compile from now on", describe_target(self.target), _guard_failure(compiled, full, kwargs))  # fmt: skip
            return self._torch_compiled()(*args, **kwargs)
        return compiled(*full, **kwargs)

    def __repr__(self) -> str:
        return f"<PrecompiledFunction {describe_target(self.target)} from {self.source}{f' ({self.reason})' if self.reason else ''}>"


def _guard_failure(compiled: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    try:
        verbose = compiled._artifacts.guard_manager.check_verbose(compiled.prepare_f_locals(*args, **kwargs))
        return "; ".join(str(part) for part in verbose.verbose_code_parts)[:500]
    except Exception as exc:  # noqa: BLE001 - a diagnostic only
        return f"reason unknown: {exc!r}"[:200]


def _session() -> Any:
    """The active castore session, installing one where there is none; None if that fails (no store)."""
    import castore.torch

    try:
        return castore.torch.active_session() or castore.torch.install()
    except Exception as exc:  # noqa: BLE001 - no store: compile without it
        log.warning("castore: ahead-of-time functions without the store: %s", exc)
        return None


def _manifest_meta(key: AotKey, target: Any, header: dict[str, Any]) -> dict[str, object]:
    from castore.torch.remote_caches import session_meta

    meta: dict[str, object] = dict(session_meta())
    meta["artifact"] = CACHE
    meta["aot.target"] = describe_target(target)
    meta.update({f"aot.key.{name}": digest for name, digest in key.components.items()})
    meta.update({f"aot.{name}": text[:MAX_META_TEXT] for name, text in key.described.items()})
    if "unserializable" in header:
        meta["aot.unserializable"] = str(header["unserializable"])[:MAX_META_TEXT]
    else:
        guards = header.get("guards", {})
        meta["aot.guards_kept"] = GuardRecord.text(guards.get("kept", {}))
        meta["aot.guards_dropped"] = GuardRecord.text(guards.get("dropped", {}))
        meta["aot.guards_dropped_names"] = "; ".join(guards.get("dropped_names", []))[:MAX_META_TEXT]
        meta["aot.traced_sources"] = len(header.get("sources", []))
    return meta


def aot_compile(target: Any, example_args: tuple[Any, ...] | Any = (), example_kwargs: dict[str, Any] | None = None, *,
                dynamic: bool | None = None, options: dict[str, Any] | None = None) -> PrecompiledFunction:  # fmt: skip
    """Load ``target``'s ahead-of-time compiled function from the store, or compile it, publish it and return it.

    ``target`` is an ``nn.Module`` (call the result with the forward's arguments; see :func:`plan_for`), a
    module's method, or a function. ``example_args`` / ``example_kwargs`` are the inputs it will be called with:
    shapes, dtypes and devices are part of the key, and so are the grad mode and autocast state of the caller
    (compile under ``torch.no_grad()`` what you will run under it). ``dynamic`` and ``options`` are
    ``torch.compile``'s. Never raises for store problems; where the target cannot be compiled ahead of time,
    the result runs ``torch.compile(target, dynamic=dynamic, options=options)`` and says why (one log line).
    """
    started = time.monotonic()
    args = tuple(example_args) if isinstance(example_args, (tuple, list)) else (example_args,)
    kwargs = dict(example_kwargs or {})
    name = describe_target(target)

    def fallback(key: AotKey | None, reason: str) -> PrecompiledFunction:
        log.warning("castore: %s is not compiled ahead of time (%s); using torch.compile", name, reason)
        return PrecompiledFunction(target, key, "fallback", reason=reason, dynamic=dynamic, options=options,
                                   seconds=time.monotonic() - started)  # fmt: skip

    try:
        key = compute_key(target, args, kwargs, dynamic=dynamic, options=options)
    except Exception as exc:  # noqa: BLE001 - a target castore cannot describe is one it must not store
        return fallback(None, f"cannot compute its key: {type(exc).__name__}: {exc}")
    session = _session()
    data = session.get(CACHE, key.key) if session is not None else None
    if data is not None:
        loaded = _load_stored(target, key, data, name)
        if isinstance(loaded, str):  # recorded as not serializable
            return fallback(key, loaded)
        if loaded is not None:
            compiled, header = loaded
            return PrecompiledFunction(target, key, "store", compiled, guards=header.get("guards"), dynamic=dynamic,
                                       options=options, seconds=time.monotonic() - started)  # fmt: skip
    guards = GuardRecord()
    try:
        compiled, payload = compile_ahead(target, args, kwargs, dynamic=dynamic, options=options, guards=guards)
    except Exception as exc:  # noqa: BLE001 - graph breaks, unserializable guards or objects, a torch without it
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:500]
        if session is not None and not isinstance(exc, AotUnavailable) and not _transient(exc):
            header = {"target": name, "unserializable": reason}
            try:
                session.put(CACHE, key.key, encode_value(header, b""), meta=_manifest_meta(key, target, header))
            except Exception as put_exc:  # noqa: BLE001 - only an optimisation for the next machine
                log.debug("castore: %s: not recording the fallback: %r", name, put_exc)
        return fallback(key, reason)
    header: dict[str, Any] = {"target": name, "guards": guards.to_header()}
    if session is not None:
        try:
            header["sources"] = traced_sources(compiled)  # without them no reader could tell the artifact is stale
            session.put(CACHE, key.key, encode_value(header, payload), meta=_manifest_meta(key, target, header))
        except Exception as exc:  # noqa: BLE001 - the compiled function is returned all the same
            log.warning("castore: %s: ahead-of-time function not published: %s: %s", name, type(exc).__name__, exc)
    return PrecompiledFunction(target, key, "compiled", compiled, guards=header["guards"], dynamic=dynamic,
                               options=options, seconds=time.monotonic() - started)  # fmt: skip


def _transient(exc: BaseException) -> bool:
    """A failure that says nothing about the target (memory, the file system): not recorded as unserializable."""
    return isinstance(exc, (MemoryError, OSError, TimeoutError)) or "out of memory" in str(exc).lower()


def _load_stored(target: Any, key: AotKey, data: bytes, name: str) -> tuple[Any, dict[str, Any]] | str | None:
    """The stored function loaded, or the reason stored for a target that is not serializable, or None (a miss:
    unreadable, stale or failing to load; said once)."""
    try:
        header, payload = decode_value(data)
    except (ValueError, UnicodeDecodeError) as exc:
        log.warning("castore: %s: stored ahead-of-time function %s unreadable (%s); compiling", name, key.key[:20], exc)
        return None
    if "unserializable" in header:
        return f"recorded in the store: {header['unserializable']}"
    stale = stale_source(header.get("sources", []))
    if stale is not None:
        log.info("castore: %s: stored ahead-of-time function is stale (%s); compiling", name, stale)
        return None
    try:
        return load_payload(target, payload), header
    except Exception as exc:  # noqa: BLE001 - another torch's format, a missing external object
        log.warning("castore: %s: loading the stored ahead-of-time function failed (%s: %s); compiling", name,
                    type(exc).__name__, str(exc)[:300])  # fmt: skip
        return None


__all__ = ["CACHE", "AotKey", "PrecompiledFunction", "aot_compile", "compute_key", "decode_value", "encode_value"]
