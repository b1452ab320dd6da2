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
import importlib
import inspect
import io
import json
import logging
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from castore.torch import collector
from castore.torch.aot_guards import GlobalStateCheck, GuardRecord, guard_failure
from castore.torch.aot_key import MAX_META_TEXT, AotKey, _digest, global_module_hooks, module_hooks
from castore.torch.aot_key import compute_key as _compute_key
from castore.torch.bound_values import first_difference

log = logging.getLogger("castore.torch")

CACHE = "aot-function"  # castore's cache name (`castore stats`) and the manifests' `artifact`
MAGIC = b"castore-aot-function\n"
VALUE_FORMAT = 1
MAX_HEADER = 16 << 20
class AotUnavailable(Exception):
    """This torch cannot compile ahead of time (no ``aot_compile``), or this target cannot be (a graph break,
    an unserializable guard or object): the caller falls back to torch.compile."""


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
    return bool(module_hooks(module) or global_module_hooks())


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


def compute_key(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *, dynamic: bool | None = None,
                options: dict[str, Any] | None = None) -> AotKey:  # fmt: skip
    """The store key of target compiled ahead of time (castore.torch.aot_key), entered as plan_for() says."""
    return _compute_key(target, args, kwargs, dynamic=dynamic, options=options, entry=plan_for(target).entry)


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
    extra: dict[str, Any] = {"external_data": plan.external} if plan.external else {}
    scope = enclosing_globals(plan.fn)
    if scope is not None and _takes(load, "f_globals"):
        extra["f_globals"] = scope
    return load(io.BytesIO(payload), **extra)


def enclosing_globals(fn: Any) -> dict[str, Any] | None:
    """The global scope of the function Dynamo traces for fn, as aot_compile gives it to the function it compiles:
    the bytecode Dynamo writes may name globals the artifact does not carry (``torch``, once a float attribute has
    become dynamic), and the guards on globals' values are checked against it."""
    try:
        from torch._dynamo.convert_frame import get_traced_fn

        traced, _ = get_traced_fn(fn)
    except Exception:  # noqa: BLE001 - another torch: the function itself, or a module's forward
        traced = getattr(type(fn), "forward", fn) if hasattr(fn, "_modules") else getattr(fn, "__func__", fn)
    scope = getattr(inspect.unwrap(traced), "__globals__", None)
    return scope if isinstance(scope, dict) else None


def describe_target(target: Any) -> str:
    obj = type(target) if not (inspect.isfunction(target) or inspect.ismethod(target)) else target
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


# -- the API ------------------------------------------------------------------------------------------------------
class PrecompiledFunction:
    """What :func:`aot_compile` returns: call it as the target (a module: with its forward's arguments).

    ``source`` says where the compiled function came from: ``"store"`` (loaded; nothing traced or compiled),
    ``"compiled"`` (compiled here and published) or ``"fallback"`` (torch.compile; ``reason`` says why). A call
    whose inputs the artifact's guards reject (another shape, grad mode) is run by torch.compile (one log line the
    first time); the calls they accept still run the stored function.
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
        # A loaded function's first call finishes its load (Inductor's kernels are set up as they are first run):
        # like the load, it runs with the cyclic collector held off.
        self._first_call = source == "store"
        self.torch_compile_calls = 0  # calls the stored function's guards or global state rejected
        self._said: set[str] = set()  # what rejected a call, logged once each
        plan = plan_for(target)
        # Compiled through the unbound forward or a method, the module comes first. Through a module's __call__,
        # Dynamo traces either Module._wrapped_call_impl (self first: a module class of its own) or a wrapper
        # taking the forward's arguments alone (torch's own classes): the stored signature says which.
        self._self_arg = plan.self_arg if plan.entry != "__call__" or _takes_self(compiled) else None
        self._global_state: GlobalStateCheck | None = None
        if compiled is not None and self.guards.get("global_state") == GlobalStateCheck.HEADER:
            try:
                self._global_state = GlobalStateCheck()
            except Exception as exc:  # noqa: BLE001 - unchecked, the stored function must not run
                log.warning("castore: %s: cannot check the global state (%s); using torch.compile",
                            describe_target(target), exc)  # fmt: skip
                self._compiled = None
        if compiled is not None and hasattr(compiled, "guard_check") and hasattr(compiled, "disable_guard_check"):
            compiled.disable_guard_check()  # checked here instead, to run torch.compile on a mismatch
            self._checks_guards = True

    @property
    def fell_back(self) -> bool:
        """Whether calls have gone to torch.compile: all of them (source "fallback"), or those the guards or the
        global state rejected."""
        return self._compiled is None or self.torch_compile_calls > 0

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
        state = self._global_state
        if state is not None and not state.check():
            return self._rejected("the global state differs from the one it was compiled for", state.differences, args, kwargs)
        if self._checks_guards and not compiled.guard_check(*full, **kwargs):
            failure = functools.partial(guard_failure, compiled, full, kwargs)
            return self._rejected("its guards reject these inputs", failure, args, kwargs)
        if self._first_call:
            self._first_call = False
            with collector.paused():
                return compiled(*full, **kwargs)
        return compiled(*full, **kwargs)

    def _rejected(self, what: str, detail: Callable[[], str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One call the stored function may not run, run by torch.compile instead. The stored function stays for
        the calls it accepts: an epoch's smaller last batch does not make the usual batch compile again."""
        self.torch_compile_calls += 1
        if what not in self._said:
            self._said.add(what)
            log.info("castore: %s: the ahead-of-time compiled function is not used where %s (%s); torch.compile runs "
                     "those calls", describe_target(self.target), what, detail())  # fmt: skip
        return self._torch_compiled()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<PrecompiledFunction {describe_target(self.target)} from {self.source}{f' ({self.reason})' if self.reason else ''}>"


def _takes_self(compiled: Any) -> bool:
    """Whether a function compiled through a module's __call__ takes the module as its first argument."""
    signature = getattr(getattr(compiled, "_artifacts", None), "signature", None)
    if not isinstance(signature, inspect.Signature):
        return True  # another torch: as the forward's entry
    first = next(iter(signature.parameters.values()), None)
    return first is not None and first.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


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
        meta["aot.global_state"] = str(guards.get("global_state", "Dynamo's guard"))
        meta["aot.traced_sources"] = len(header.get("sources", []))
    return meta


def mode_options(mode: str) -> dict[str, Any] | None:
    """torch.compile's ``mode`` as the Inductor options it stands for: what the key covers, and what a fallback
    passes to torch.compile (None for the default mode)."""
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode)) or None


def aot_compile(target: Any, example_args: tuple[Any, ...] | Any = (), example_kwargs: dict[str, Any] | None = None, *,
                dynamic: bool | None = None, mode: str | None = None,
                options: dict[str, Any] | None = None) -> PrecompiledFunction:  # fmt: skip
    """Load ``target``'s ahead-of-time compiled function from the store, or compile it, publish it and return it.

    ``target`` is an ``nn.Module`` (call the result with the forward's arguments; see :func:`plan_for`), a
    module's method, or a function. ``example_args`` / ``example_kwargs`` are the inputs it will be called with:
    shapes, dtypes and devices are part of the key, and so are the grad mode and autocast state of the caller
    (compile under ``torch.no_grad()`` what you will run under it). ``dynamic``, ``mode`` and ``options`` are
    ``torch.compile``'s (a mode is keyed as the options it stands for; giving both is a ValueError, as there).
    Never raises for store problems; where the target cannot be compiled ahead of time, the result runs
    ``torch.compile(target, dynamic=dynamic, options=options)`` and says why (one log line).
    """
    started = time.monotonic()
    if mode is not None and options is not None:
        raise ValueError("aot_compile takes mode= or options=, not both (as torch.compile)")
    args = tuple(example_args) if isinstance(example_args, (tuple, list)) else (example_args,)
    kwargs = dict(example_kwargs or {})
    name = describe_target(target)

    def fallback(key: AotKey | None, reason: str) -> PrecompiledFunction:
        log.warning("castore: %s is not compiled ahead of time (%s); using torch.compile", name, reason)
        return PrecompiledFunction(target, key, "fallback", reason=reason, dynamic=dynamic, options=options,
                                   seconds=time.monotonic() - started)  # fmt: skip

    # The key (its environment imports Inductor), the lookup and the load make objects that live on: the cyclic
    # collector is held off until they are done (collector.py). A compile below makes garbage: it runs with it.
    with collector.paused():
        if mode is not None:  # imports Inductor: with the collector held off too
            options = mode_options(mode)
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
                return PrecompiledFunction(target, key, "store", compiled, guards=header.get("guards"),
                                           dynamic=dynamic, options=options, seconds=time.monotonic() - started)  # fmt: skip
    guards = GuardRecord(free_threads=key.threads_free)
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
        compiled = load_payload(target, payload)
        plan = plan_for(target)
        # Through a module's __call__ the stored closure is PyTorch's wrapper around the module, which the load
        # replaces with this process's (external data); its hooks' values are in the key.
        difference = first_difference(plan.fn, compiled) if plan.entry != "__call__" else None
    except Exception as exc:  # noqa: BLE001 - another torch's format, a missing external object
        log.warning("castore: %s: loading the stored ahead-of-time function failed (%s: %s); compiling", name,
                    type(exc).__name__, str(exc)[:300])  # fmt: skip
        return None
    if difference is not None:  # values the key describes by type only (an object without a value of its own)
        log.info("castore: %s: stored ahead-of-time function is stale (%s differs); compiling", name, difference)
        return None
    return compiled, header


__all__ = ["CACHE", "AotKey", "PrecompiledFunction", "aot_compile", "compute_key", "decode_value", "encode_value"]
