"""The ahead-of-time key names the installed distribution of each package its code comes from, found without
reading the metadata of every installed distribution."""

from __future__ import annotations

import importlib
import sys
from importlib import metadata
from pathlib import Path

import pytest

from castore.torch.package_versions import package_version


def _site(tmp_path: Path, package: str, dist: str, version: str, *, top_level: bool) -> Path:
    """A sys.path folder holding `package` and the .dist-info of `dist` that installed it."""
    site = tmp_path / "site"
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text("VALUE = 1\n")
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "RECORD").write_text(f"{package}/__init__.py,,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
    if top_level:
        (info / "top_level.txt").write_text(f"{package}\n")
    return site


@pytest.fixture
def on_path(monkeypatch: pytest.MonkeyPatch):
    added: list[str] = []

    def add(folder: Path, package: str) -> None:
        monkeypatch.syspath_prepend(str(folder))
        importlib.invalidate_caches()
        importlib.import_module(package)
        added.append(package)

    package_version.cache_clear()
    yield add
    for name in added:
        sys.modules.pop(name, None)
    package_version.cache_clear()


def _no_full_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> None:
        raise AssertionError("read every installed distribution's metadata")

    monkeypatch.setattr(metadata, "packages_distributions", fail)


@pytest.mark.parametrize("top_level", [True, False], ids=["top_level.txt", "RECORD"])
def test_a_package_named_unlike_its_distribution_gets_that_distribution_s_version(tmp_path, on_path, monkeypatch, top_level):
    _no_full_scan(monkeypatch)
    on_path(_site(tmp_path, "castore_probe_pkg", "Probe-Dist", "3.1.4", top_level=top_level), "castore_probe_pkg")
    assert package_version("castore_probe_pkg") == "Probe-Dist==3.1.4"


def test_a_package_named_as_its_distribution_is_found_directly(tmp_path, on_path, monkeypatch):
    _no_full_scan(monkeypatch)
    on_path(_site(tmp_path, "castore_probe_same", "castore_probe_same", "0.9", top_level=True), "castore_probe_same")
    assert package_version("castore_probe_same") == "castore_probe_same==0.9"


def test_code_outside_any_installed_distribution_has_no_version(tmp_path, on_path, monkeypatch):
    _no_full_scan(monkeypatch)
    tree = tmp_path / "src"
    (tree / "castore_probe_tree").mkdir(parents=True)
    (tree / "castore_probe_tree" / "__init__.py").write_text("")
    on_path(tree, "castore_probe_tree")
    assert package_version("castore_probe_tree") is None


def test_installed_packages_get_the_version_packages_distributions_names():
    """Against the standard library's full scan, for the packages installed here that are imported."""
    full = metadata.packages_distributions()
    checked = 0
    for top, names in sorted(full.items()):
        if top not in sys.modules or not top.isidentifier():
            continue
        try:
            expected = f"{top}=={metadata.version(top)}"
        except metadata.PackageNotFoundError:
            expected = ",".join(sorted({f"{metadata.metadata(n)['Name']}=={metadata.version(n)}" for n in names})) or None
        assert package_version(top) == expected, top
        checked += 1
    assert checked >= 5
