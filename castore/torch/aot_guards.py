"""Which of Dynamo's guards an ahead-of-time compiled function keeps (castore.torch.precompiled): the filter given
to ``aot_compile``, the record of what it kept and dropped (in the artifact's header and manifest), and castore's own
check of the global state where the compiled code does not depend on the thread count (docs/TORCH.md, "Guards",
"The thread count")."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from castore.torch.aot_key import dynamo_global_state

# Guards on a global that compare its value (torch's default for aot_compile drops every guard on a global).
GLOBAL_VALUE_GUARDS = ("CONSTANT_MATCH", "EQUALS_MATCH")
# What torch's own default guard filter for aot_compile drops besides globals (CheckFunctionManager's list).
_UNSERIALIZABLE_GUARDS = ("DICT_VERSION", "NN_MODULE", "ID_MATCH", "FUNCTION_MATCH", "CLASS_MATCH", "MODULE_MATCH",
                          "CLOSURE_MATCH", "WEAKREF_ALIVE")  # fmt: skip


@dataclass
class GuardRecord:
    """Which of Dynamo's guards the artifact keeps and which it drops: those that cannot be serialized, and those on
    globals but the ones that compare a global's value (a module-level flag the code branches on). Those are
    checked against the reading process's globals when the loaded function is called (castore passes the
    traced function's module globals to the load): a flag set otherwise there makes the call fall back to
    torch.compile instead of running code traced for the writer's value."""

    kept: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    dropped_names: list[str] = field(default_factory=list)
    # Where the compiled code runs alike at any thread count (aot_key.threads_free), Dynamo's global-state guard
    # is dropped and castore checks that state at each call without the count (GlobalStateCheck).
    free_threads: bool = False
    global_state_by_castore: bool = False

    def filter(self, user_filter: Callable[[Any], Any] | None) -> Callable[[Any], list[bool]]:
        def guard_filter(entries: Any) -> list[bool]:
            if user_filter is not None:
                keep = [bool(k) for k in user_filter(entries)]
            else:  # torch's own default for aot_compile, but for the guards on a global's value
                unserializable = _unserializable_guard_types()
                by_castore = self.free_threads and GlobalStateCheck.available()
                keep = [g.guard_type not in unserializable and (not g.is_global or g.guard_type in GLOBAL_VALUE_GUARDS)
                        and not (by_castore and g.guard_type == GLOBAL_STATE_GUARD)
                        for g in entries]  # fmt: skip
                self.global_state_by_castore = by_castore and any(g.guard_type == GLOBAL_STATE_GUARD for g in entries)
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
        header: dict[str, Any] = {"kept": dict(self.kept), "dropped": dict(self.dropped),
                                  "dropped_names": self.dropped_names[:200]}  # fmt: skip
        if self.global_state_by_castore:
            header["global_state"] = GlobalStateCheck.HEADER
        return header

    @staticmethod
    def text(counts: dict[str, int]) -> str:
        return ", ".join(f"{name} {n}" for name, n in sorted(counts.items())) or "none"


GLOBAL_STATE_GUARD = "GLOBAL_STATE"


class GlobalStateCheck:
    """Dynamo's global-state guard without the thread count, for compiled code that does not depend on it: the
    state when the function was loaded (or compiled), which the key made the writer's but for the count, checked
    at each call in C++; a mismatch is compared again field by field, so that only another count passes."""

    HEADER = "castore, without num_threads"

    def __init__(self) -> None:
        from torch._C._dynamo.guards import GlobalStateGuard

        self._new = GlobalStateGuard
        self._guard = GlobalStateGuard()
        self._state = self._fields(self._guard)
        if not self._state:
            raise RuntimeError("Dynamo's global state cannot be read")

    @staticmethod
    def available() -> bool:
        return "num_threads" in dynamo_global_state(False)  # else another torch: Dynamo's own guard stays

    @staticmethod
    def _fields(guard: Any) -> dict[str, Any]:
        return dynamo_global_state(True, guard)

    def check(self) -> bool:
        if self._guard.check():
            return True
        now = self._new()
        if self._fields(now) != self._state:
            return False
        self._guard = now  # only the thread count changed
        return True

    def differences(self) -> str:
        now = self._fields(self._new())
        return ", ".join(f"{k}: {self._state.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(now) | set(self._state))
                         if now.get(k) != self._state.get(k))[:300] or "none"  # fmt: skip


def _unserializable_guard_types() -> tuple[str, ...]:
    try:
        from torch._dynamo.guards import CheckFunctionManager

        return tuple(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)
    except Exception:  # noqa: BLE001 - another torch: its list as of 2.13
        return _UNSERIALIZABLE_GUARDS


def guard_failure(compiled: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The guards a call failed, as Dynamo words them (for the log line)."""
    try:
        verbose = compiled._artifacts.guard_manager.check_verbose(compiled.prepare_f_locals(*args, **kwargs))
        return "; ".join(str(part) for part in verbose.verbose_code_parts)[:500]
    except Exception as exc:  # noqa: BLE001 - a diagnostic only
        return f"reason unknown: {exc!r}"[:200]
