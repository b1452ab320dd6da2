"""Why this machine misses: its environment fingerprint against those recorded in the bucket's entries or a bundle.

PyTorch keys every cache entry by the torch build, Triton, CUDA, the GPU, the CPU's vector ISA, Python and the
compile flags. An entry written where any of them differs is never looked up here. The doctor groups the entries
by their writer's fingerprint (``env.*`` meta), finds the group nearest to this machine, and names each field
that differs with what to do about it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from castore.errors import CastoreError
from castore.torch import bytecode
from castore.torch.fingerprint import Fingerprint, fingerprint, from_meta

if TYPE_CHECKING:
    from castore.store import Store

DEFAULT_LIMIT = 5000  # entries read per namespace: the most recent ones
# Fields that tell where an entry came from but that no key contains.
_INFORMATIONAL = {"os"}


class NoSuchBundle(CastoreError):
    """The bundle named is not in the store."""


@dataclass
class FieldDiff:
    field: str
    here: object
    there: object
    fix: str

    def sentence(self) -> str:
        return f"{self.field}: {_show(self.here)} here, {_show(self.there)} in the bucket: {self.fix}"


@dataclass
class EnvGroup:
    """Entries written in one environment."""

    fingerprint: Fingerprint
    entries: int
    namespaces: list[str]
    diffs: list[FieldDiff]


@dataclass
class DoctorReport:
    url: str
    here: Fingerprint
    namespace: str  # where this machine looks
    entries: int = 0  # entries read
    entries_without_fingerprint: int = 0
    groups: list[EnvGroup] = field(default_factory=list)  # nearest first
    bundle: str | None = None
    bundle_entries: int = 0
    advice: list[str] = field(default_factory=list)

    @property
    def nearest(self) -> EnvGroup | None:
        return self.groups[0] if self.groups else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "namespace": self.namespace,
            "here": self.here,
            "entries": self.entries,
            "entries_without_fingerprint": self.entries_without_fingerprint,
            "bundle": self.bundle,
            "bundle_entries": self.bundle_entries,
            "groups": [
                {"entries": g.entries, "namespaces": g.namespaces, "differs": {d.field: {"here": d.here, "there": d.there, "fix": d.fix} for d in g.diffs}}
                for g in self.groups
            ],
            "advice": self.advice,
        }


def _show(value: object) -> str:
    return "none" if value in ("", None) else str(value)


def fix_for(name: str, here: object, there: object) -> str:
    """What to do so that this machine's field matches the entries'."""
    h, t = _show(here), _show(there)
    if name == "torch":
        return f"install torch=={str(there).split('+')[0]} (the build the entries used) or prewarm with this torch ({h})"
    if name == "torch_git":
        return "same version, another build of torch: install the exact build the entries used, or prewarm with this one"
    if name == "triton":
        return f"install triton=={t}, or prewarm with this Triton" if there else "the entries were written without Triton"
    if name in ("cuda", "hip"):
        return f"use a torch build for {name.upper()} {t}, or prewarm with this build"
    if name in ("gpu_name", "gpu_capability"):
        return (f"the entries were compiled for a GPU with {name.replace('gpu_', '')} {t}: kernels are specific to "
                "the GPU architecture; prewarm on this GPU type")
    if name == "gpu_index":
        return (f"the entries were compiled on cuda:{t}, this process uses cuda:{h}: select the device with "
                "CUDA_VISIBLE_DEVICES (so that the process uses cuda:0 as the writers did) rather than torch.cuda.set_device")
    if name == "cpu_arch":
        return f"the entries were built for {t} CPUs: prewarm on a {h} machine"
    if name == "cpu_isa":
        return (f"C++ kernels were generated for {t}, this CPU gets {h}: prewarm on this CPU type, or set "
                f"ATEN_CPU_CAPABILITY on every machine to one ISA all of them have")
    if name == "aten_cpu_capability":
        return f"set ATEN_CPU_CAPABILITY={t} here as the writers did" if there else "unset ATEN_CPU_CAPABILITY, as on the writers"
    if name in ("python", "python_abi"):
        return f"use Python {t} (the interpreter version is part of the keys)"
    if name.startswith("flag."):
        _, module, setting = name.split(".", 2)
        env = "TORCHINDUCTOR_" + setting.upper().replace(".", "_") if module == "inductor" else None
        how = f" (or {env}={t})" if env and "." not in setting else ""
        return f"set torch._{module}.config.{setting} = {t} as the writers did{how}"
    if name == "inductor_config_hash":
        return "another torch._inductor.config setting differs: compare torch._inductor.config.save_config_portable() on both machines"
    if name == "functorch_config_hash":
        return "another torch._functorch.config setting differs: compare torch._functorch.config.save_config_portable()"
    return "make it match the writers'"


def _settings(text: object) -> dict[str, object] | None:
    try:
        value = json.loads(text) if isinstance(text, str) and text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _setting_diffs(module: str, here: Fingerprint, there: Fingerprint, named: set[str]) -> list[FieldDiff] | None:
    """The settings of torch._<module>.config behind a differing hash, from the changed-from-default lists both
    sides recorded; None when either side did not record one."""
    mine, theirs = _settings(here.get(f"{module}_changed")), _settings(there.get(f"{module}_changed"))
    if mine is None or theirs is None:
        return None
    diffs = []
    for setting in sorted(set(mine) | set(theirs)):
        if f"flag.{module}.{setting}" in named or mine.get(setting) == theirs.get(setting):
            continue
        h, t = mine.get(setting, "(default)"), theirs.get(setting, "(default)")
        fix = f"set torch._{module}.config.{setting} = {t} as the writers did" if setting in theirs else (
            f"leave torch._{module}.config.{setting} at PyTorch's default, as the writers did")
        if any(isinstance(v, str) and "/" in v for v in (h, t)):
            fix += " (a path that enters PyTorch's keys: use the same path on every machine)"
        diffs.append(FieldDiff(f"{module}.{setting}", h, t, fix))
    return diffs


def _same(a: object, b: object) -> bool:
    """Equal, or equal as text: a bundle records its fingerprint as text (castore.bundles)."""
    return a == b or ("" if a is None else str(a)) == ("" if b is None else str(b))


def compare(here: Fingerprint, there: Fingerprint) -> list[FieldDiff]:
    """The fields recorded in ``there`` that differ here (an entry records what its castore version knew)."""
    diffs = []
    named = {f for f, v in there.items() if f.startswith("flag.") and f in here and not _same(here[f], v)}
    for name, value in there.items():
        if name in _INFORMATIONAL or name.endswith("_changed") or name not in here or _same(here[name], value):
            continue
        if name == "gpu_index" and not here.get("gpu_name") and not there.get("gpu_name"):
            continue
        if name.endswith("_config_hash"):
            # Name the settings behind the hash; a named flag that differs explains its module's hash already.
            module = name.split("_")[0]
            settings = _setting_diffs(module, here, there, named)
            if settings:
                diffs.extend(settings)
                continue
            if any(f.startswith(f"flag.{module}.") for f in named):
                continue
        diffs.append(FieldDiff(name, here[name], value, fix_for(name, here[name], value)))
    return diffs


def _namespaces(store: Store, wanted: list[str] | None, here_ns: str) -> list[str]:
    """The namespaces given; else the torch integration's (torch-<version>) and this machine's; else every one."""
    if wanted:
        return wanted
    present = store.namespaces()
    found = sorted({ns for ns in present if ns.startswith("torch-")} | ({here_ns} & set(present)))
    return found or present


def diagnose(store: Store, *, namespaces: list[str] | None = None, bundle: str | None = None, here: Fingerprint | None = None,
             here_namespace: str | None = None, limit: int | None = DEFAULT_LIMIT) -> DoctorReport:
    """Compare this machine's fingerprint with the bundle's, or with the entries of the torch namespaces (the
    ``limit`` most recent of each). The advice ends with what this machine's Python costs every fresh process
    (castore.torch.bytecode), hit or miss."""
    here = dict(here if here is not None else fingerprint())
    if here_namespace is None:
        from castore.torch import default_namespace

        here_namespace = os.environ.get("CASTORE_NAMESPACE") or default_namespace()
    report = DoctorReport(url=store.url, here=here, namespace=here_namespace)
    if bundle is not None:
        report = _diagnose_bundle(store, report, bundle)
    else:
        _diagnose_entries(store, report, namespaces, limit)
    report.advice += bytecode.advice(bytecode.compiler_bytecode())  # a cost of every fresh process, hit or miss
    return report


def _diagnose_entries(store: Store, report: DoctorReport, namespaces: list[str] | None, limit: int | None) -> None:
    from castore.gc import read_manifests

    here, here_namespace = report.here, report.namespace
    by_env: dict[tuple[tuple[str, object], ...], tuple[Fingerprint, Counter[str]]] = {}
    for ns in _namespaces(store, namespaces, here_namespace):
        for record in read_manifests(store, ns, limit=limit):
            if record.manifest is None or record.manifest.kind == "bundle":
                continue
            report.entries += 1
            fp = from_meta(record.manifest.meta)
            if not fp:
                report.entries_without_fingerprint += 1
                continue
            env = tuple(sorted((k, v) for k, v in fp.items() if k not in _INFORMATIONAL))
            group = by_env.setdefault(env, (fp, Counter()))
            group[1][ns] += 1
    for fp, per_ns in by_env.values():
        report.groups.append(EnvGroup(fp, sum(per_ns.values()), sorted(per_ns), compare(here, fp)))
    report.groups.sort(key=lambda g: (len(g.diffs), -g.entries))
    report.advice = _advice(report)


def _diagnose_bundle(store: Store, report: DoctorReport, name: str) -> DoctorReport:
    from castore.gc import read_manifests

    candidates = []
    for ns in store.namespaces():
        keys_ = [k for _, k, _ in store.list(ns) if k == name or k.startswith((name + "@", name + "."))]
        if not keys_:
            continue
        for record in read_manifests(store, ns):
            if record.key in keys_ and record.manifest is not None and record.manifest.kind == "bundle":
                candidates.append(record.manifest)
    if not candidates:
        raise NoSuchBundle(f"no bundle named {name!r} in {store.url} (bundles are published by `castore prewarm`)")
    manifest = max(candidates, key=lambda m: m.created)  # the newest version
    report.bundle = f"{manifest.namespace}/{manifest.key}"
    report.bundle_entries = len(manifest.refs)
    report.entries = len(manifest.refs)
    fp = from_meta(manifest.meta)
    if not fp:
        report.advice = [f"bundle {report.bundle} records no environment fingerprint: nothing to compare with."]
        return report
    report.groups = [EnvGroup(fp, len(manifest.refs), sorted({ns for ns, _ in manifest.refs}), compare(report.here, fp))]
    report.advice = _advice(report)
    return report


def _advice(report: DoctorReport) -> list[str]:
    what = f"bundle {report.bundle}" if report.bundle else f"the {report.entries} entries of {report.url}"
    nearest = report.nearest
    if nearest is None:
        if report.entries == 0:
            return [f"{report.url} holds no torch.compile entries yet: the first run of a job fills it."]
        return [f"None of {what} records its writer's environment (written by an older castore): nothing to compare."]
    lines = []
    if not nearest.diffs:
        lines.append(
            f"This machine matches the environment of {nearest.entries} entries ({', '.join(nearest.namespaces)}): they can hit here."
        )
        if report.namespace not in nearest.namespaces and not report.bundle:
            lines.append(f"But this machine looks in namespace {report.namespace}: set CASTORE_NAMESPACE to use them.")
        lines.append(
            "If this machine still misses them, what differs is in PyTorch's keys themselves: the model's code, "
            "its input shapes or dtypes, or a path that ends up in a key (run with TORCH_LOGS=+torch._inductor.codecache "
            "to see the key details)."
        )
    else:
        source = f"bundle {report.bundle}" if report.bundle else f"the nearest {nearest.entries} entries ({', '.join(nearest.namespaces)})"
        lines.append(f"This machine misses {source}: {len(nearest.diffs)} of the fields PyTorch keys by differ.")
        lines.extend(f"- {d.sentence()}" for d in nearest.diffs)
        lines.append(f"With these matching, this machine would hit {nearest.entries} entries.")
    others = report.groups[1:]
    if others:
        lines.append(f"Other environments in the bucket: {len(others)} ({sum(g.entries for g in others)} entries), "
                     "each further from this machine.")
    if report.entries_without_fingerprint:
        lines.append(f"{report.entries_without_fingerprint} entries (castore's own artifacts, or written by an older castore) "
                     "record no fingerprint and were not compared.")
    return lines


__all__ = ["DoctorReport", "EnvGroup", "FieldDiff", "NoSuchBundle", "compare", "diagnose", "fix_for"]
