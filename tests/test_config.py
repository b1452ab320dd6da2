"""Configuration precedence: arguments > environment > castore.toml > pyproject [tool.castore] > user file > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from castore.config import Config, load_config, parse_bool, parse_size
from castore.errors import ConfigError


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(project dir, XDG config home), both empty; the real user's files are out of reach."""
    cwd = tmp_path / "project"
    xdg = tmp_path / "xdg"
    cwd.mkdir()
    (xdg / "castore").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    return cwd, xdg


def _load(cwd: Path, xdg: Path, overrides: dict | None = None, env: dict | None = None) -> Config:
    return load_config(overrides, env={"XDG_CONFIG_HOME": str(xdg), **(env or {})}, cwd=cwd)


def _write_all_layers(cwd: Path, xdg: Path) -> None:
    (xdg / "castore" / "config.toml").write_text(
        'url = "file:///user"\ncache_dir = "/user/cache"\ncache_size = "1G"\nworkers = 3\nmax_attempts = 7\nread_timeout = 5.5\n'
    )
    (cwd / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.castore]\nurl = "file:///pyproject"\ncache_dir = "/pyproject/cache"\ncache_size = "2G"\nworkers = 4\n'
    )
    (cwd / "castore.toml").write_text('url = "file:///castore-toml"\ncache_dir = "/castore-toml/cache"\ncache_size = "3G"\n')


def test_defaults(dirs: tuple[Path, Path]) -> None:
    cwd, xdg = dirs
    config = _load(cwd, xdg)
    assert config.cache_size == 10 << 30
    assert config.read_only is False
    assert config.url == "file://" + str(Path(dirs[0].parent / "home" / ".cache" / "castore" / "store"))
    assert all(source == "default" for _, _, source in config.describe())
    assert config.sources == {}


def test_precedence_and_sources(dirs: tuple[Path, Path]) -> None:
    cwd, xdg = dirs
    _write_all_layers(cwd, xdg)
    config = _load(cwd, xdg, overrides={"url": "memory://arg", "read_only": None}, env={"CASTORE_CACHE_DIR": "/env/cache", "CASTORE_READ_ONLY": "yes"})
    assert config.url == "memory://arg"
    assert config.sources["url"] == "argument"
    assert config.cache_dir == "/env/cache"
    assert config.sources["cache_dir"] == "environment CASTORE_CACHE_DIR"
    assert config.read_only is True  # None in overrides means 'not given', the environment decides
    assert config.sources["read_only"] == "environment CASTORE_READ_ONLY"
    assert config.cache_size == 3 << 30
    assert config.sources["cache_size"] == f"{cwd / 'castore.toml'}"
    assert config.workers == 4
    assert config.sources["workers"] == f"{cwd / 'pyproject.toml'} [tool.castore]"
    assert config.max_attempts == 7 and config.read_timeout == 5.5
    assert config.sources["max_attempts"] == str(xdg / "castore" / "config.toml")
    assert config.connect_timeout == 2.0
    assert "connect_timeout" not in config.sources
    described = {name: (value, source) for name, value, source in config.describe()}
    assert described["connect_timeout"] == (2.0, "default")
    assert described["url"] == ("memory://arg", "argument")


def test_each_layer_peeled_off(dirs: tuple[Path, Path]) -> None:
    cwd, xdg = dirs
    _write_all_layers(cwd, xdg)
    assert _load(cwd, xdg, env={"CASTORE_URL": "memory://env"}).url == "memory://env"
    assert _load(cwd, xdg).url == "file:///castore-toml"
    (cwd / "castore.toml").unlink()
    assert _load(cwd, xdg).url == "file:///pyproject"
    (cwd / "pyproject.toml").write_text('[project]\nname = "x"\n')  # a pyproject without [tool.castore]
    assert _load(cwd, xdg).url == "file:///user"
    (xdg / "castore" / "config.toml").unlink()
    config = _load(cwd, xdg)
    assert config.url.endswith("/.cache/castore/store")
    assert "url" not in config.sources


def test_environment_is_read_from_os_environ_by_default(dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cwd, xdg = dirs
    monkeypatch.setenv("CASTORE_WORKERS", "9")
    monkeypatch.setenv("CASTORE_CACHE_SIZE", "512M")
    config = load_config(cwd=cwd)
    assert config.workers == 9 and config.cache_size == 512 << 20
    assert config.sources["workers"] == "environment CASTORE_WORKERS"


def test_user_file_location_follows_xdg(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    cwd, xdg = dirs
    other = tmp_path / "other-xdg"
    (other / "castore").mkdir(parents=True)
    (other / "castore" / "config.toml").write_text("workers = 5\n")
    (xdg / "castore" / "config.toml").write_text("workers = 6\n")
    assert load_config(env={"XDG_CONFIG_HOME": str(other)}, cwd=cwd).workers == 5
    assert _load(cwd, xdg).workers == 6


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512M", 512 << 20),
        ("10G", 10 << 30),
        ("1.5GiB", int(1.5 * (1 << 30))),
        ("1.5 GB", int(1.5 * (1 << 30))),
        ("64k", 64 << 10),
        ("2T", 2 << 40),
        ("4096", 4096),
        ("100B", 100),
        (" 7 MiB ", 7 << 20),
        (0, 0),
        (123, 123),
    ],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "G", "-1G", "ten", "1.2.3G", "5X", "1 PB", True, "1e3"])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ConfigError):
        parse_size(bad)


def test_parse_bool() -> None:
    assert parse_bool("Yes") is parse_bool("on") is parse_bool("1") is parse_bool(True) is True
    assert parse_bool("off") is parse_bool("0") is parse_bool("") is parse_bool(False) is False
    with pytest.raises(ConfigError):
        parse_bool("maybe")


@pytest.mark.parametrize(
    "env",
    [
        {"CASTORE_CACHE_SIZE": "lots"},
        {"CASTORE_CACHE_SIZE": "-5"},
        {"CASTORE_WORKERS": "0"},
        {"CASTORE_WORKERS": "many"},
        {"CASTORE_MAX_ATTEMPTS": "0"},
        {"CASTORE_READ_ONLY": "perhaps"},
        {"CASTORE_CONNECT_TIMEOUT": "fast"},
    ],
)
def test_bad_environment_values(dirs: tuple[Path, Path], env: dict[str, str]) -> None:
    cwd, xdg = dirs
    with pytest.raises(ConfigError) as info:
        _load(cwd, xdg, env=env)
    name = next(iter(env)).removeprefix("CASTORE_").lower()
    assert name in str(info.value) or "must be" in str(info.value)


def test_bad_argument_and_file_values(dirs: tuple[Path, Path]) -> None:
    cwd, xdg = dirs
    with pytest.raises(ConfigError):
        _load(cwd, xdg, overrides={"workers": "x"})
    (cwd / "castore.toml").write_text("workers = [1, 2]\n")
    with pytest.raises(ConfigError) as info:
        _load(cwd, xdg)
    assert "castore.toml" in str(info.value)


def test_unknown_keys_in_files_are_rejected(dirs: tuple[Path, Path]) -> None:
    cwd, xdg = dirs
    (cwd / "castore.toml").write_text('url = "memory://x"\ncache_sise = "1G"\n')
    with pytest.raises(ConfigError, match="cache_sise"):
        _load(cwd, xdg)
    (cwd / "castore.toml").unlink()
    (cwd / "pyproject.toml").write_text("[tool.castore]\nbogus = 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        _load(cwd, xdg)
    (cwd / "pyproject.toml").unlink()
    (xdg / "castore" / "config.toml").write_text("[section]\nurl = 'x'\n")
    with pytest.raises(ConfigError, match="section"):
        _load(cwd, xdg)


def test_malformed_files(dirs: tuple[Path, Path]) -> None:
    cwd, xdg = dirs
    (cwd / "castore.toml").write_text("url = \n")
    with pytest.raises(ConfigError, match="castore.toml"):
        _load(cwd, xdg)
    (cwd / "castore.toml").unlink()
    (cwd / "pyproject.toml").write_text('[tool]\ncastore = "not a table"\n')
    with pytest.raises(ConfigError):
        _load(cwd, xdg)


def test_cache_dir_is_expanded(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    cwd, xdg = dirs
    config = _load(cwd, xdg, overrides={"cache_dir": "~/layer"})
    assert config.cache_dir == str(tmp_path / "home" / "layer")
