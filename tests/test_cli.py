"""The castore command line, through click's CliRunner and as a real subprocess."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from castore.cli import common
from castore.cli import main
from castore.errors import BackendError
from castore.format import keys


def _rand(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No user or project configuration leaks in; cwd is a scratch directory."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name in list(os.environ):
        if name.startswith("CASTORE_"):
            monkeypatch.delenv(name)


@pytest.fixture(params=["file", "memory"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"file://{tmp_path / 'store'}" if request.param == "file" else f"memory://cli-{uuid.uuid4().hex}"


@pytest.fixture
def file_url(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'store'}"


def run(url: str | None, *args: str, input: bytes | None = None) -> Result:  # noqa: A002
    argv = (["--url", url] if url else []) + list(args)
    return CliRunner().invoke(main, argv, input=input, catch_exceptions=False)


def run_json(url: str, *args: str) -> object:
    result = run(url, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# -- round trips ------------------------------------------------------------------------------------------
def test_file_round_trip(url: str, tmp_path: Path) -> None:
    src = tmp_path / "artifact.bin"
    src.write_bytes(_rand(400_000, seed=1))
    src.chmod(0o750)
    put = run(url, "put", "ns", "key:1", str(src), "--meta", "origin=test", "--meta", "x=a=b")
    assert put.exit_code == 0, put.output
    assert "ns/key:1" in put.stdout
    got = run(url, "get", "ns", "key:1", "out.bin")
    assert got.exit_code == 0, got.output
    assert Path("out.bin").read_bytes() == src.read_bytes()
    assert stat.S_IMODE(Path("out.bin").stat().st_mode) == 0o750
    # DEST omitted: ./KEY, with a new file's mode (name and mode are not taken from the bucket unasked);
    # a directory DEST: KEY inside it.
    assert run(url, "get", "ns", "key:1").exit_code == 0
    assert Path("key:1").read_bytes() == src.read_bytes()
    assert not Path("artifact.bin").exists()
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(Path("key:1").stat().st_mode) == 0o666 & ~umask
    Path("d").mkdir()
    assert run(url, "get", "ns", "key:1", "d").exit_code == 0
    assert Path("d/key:1").read_bytes() == src.read_bytes()
    meta = run_json(url, "stat", "ns", "key:1")["meta"]
    assert meta["origin"] == "test" and meta["x"] == "a=b" and meta["filename"] == "artifact.bin"


def test_stdin_and_stdout_round_trip(url: str) -> None:
    data = _rand(100_000, seed=2) + b"\x00\r\n\xff"
    put = run(url, "put", "ns", "piped", "-", input=data)
    assert put.exit_code == 0, put.output
    got = run(url, "get", "ns", "piped", "-")
    assert got.exit_code == 0
    assert got.stdout_bytes == data
    small = run(url, "put", "ns", "tiny", "-", input=b"hi\n")
    assert small.exit_code == 0
    assert run(url, "get", "ns", "tiny", "-").stdout_bytes == b"hi\n"


def test_tree_round_trip_keeps_modes(url: str, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    files = {"run.sh": (b"#!/bin/sh\n", 0o755), "sub/data.bin": (_rand(150_000, seed=3), 0o600), "sub/empty": (b"", 0o644)}
    for rel, (content, mode) in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(content)
        (src / rel).chmod(mode)
    (src / "emptydir").mkdir()
    put = run_json(url, "put", "ns", "tree", str(src))
    assert put["kind"] == "tree" and put["size"] == sum(len(c) for c, _ in files.values())
    summary = run_json(url, "stat", "ns", "tree")
    assert summary["kind"] == "tree" and summary["files"] == 3 and summary["directories"] == 2
    got = run(url, "get", "ns", "tree", str(tmp_path / "copy"))
    assert got.exit_code == 0, got.output
    for rel, (content, mode) in files.items():
        assert (tmp_path / "copy" / rel).read_bytes() == content
        assert stat.S_IMODE((tmp_path / "copy" / rel).stat().st_mode) == mode
    assert (tmp_path / "copy" / "emptydir").is_dir()
    # A tree cannot go to stdout.
    assert run(url, "get", "ns", "tree", "-").exit_code == 2


def test_overwrite_needs_force(url: str) -> None:
    assert run(url, "put", "ns", "k", "-", input=b"first").exit_code == 0
    again = run(url, "put", "ns", "k", "-", "--json", input=b"second")
    assert again.exit_code == 0
    assert json.loads(again.stdout)["published"] is False
    assert "--force" in again.stderr
    assert run(url, "get", "ns", "k", "-").stdout_bytes == b"first"
    assert run(url, "put", "ns", "k", "-", "--force", input=b"second").exit_code == 0
    assert run(url, "get", "ns", "k", "-").stdout_bytes == b"second"


# -- JSON output ------------------------------------------------------------------------------------------
def test_json_output_of_every_command(url: str, tmp_path: Path) -> None:
    data = _rand(300_000, seed=4)
    result = run(url, "put", "ns", "a", "-", "--json", input=data)
    put = json.loads(result.stdout)
    assert put["published"] and put["size"] == len(data) and put["chunks"] >= 2 and put["chunks_uploaded"] == put["chunks"]
    assert run(url, "put", "other", "b", "-", input=b"small").exit_code == 0
    listing = run_json(url, "ls")
    assert [(r["namespace"], r["key"]) for r in listing] == [("ns", "a"), ("other", "b")]
    assert [r["key"] for r in run_json(url, "ls", "other")] == ["b"]
    long_ = run_json(url, "ls", "-l")
    assert {r["key"]: r["size"] for r in long_} == {"a": len(data), "b": 5}
    st = run_json(url, "stat", "ns", "a")
    assert st["size"] == len(data) and st["chunks"] == put["chunks"] and st["codecs"] == {"raw": st["chunks"]}
    assert st["stored_size"] >= len(data) and "created" in st and st["digest"] == put["digest"]
    got = run_json(url, "get", "ns", "a", str(tmp_path / "x.bin"))
    assert got["size"] == len(data)
    v = run_json(url, "verify")
    assert v["ok"] is True and v["manifests"] == 2 and v["bad"] == []
    assert run_json(url, "verify", "ns")["manifests"] == 1
    assert run_json(url, "verify", "ns", "a")["chunks"] == put["chunks"]
    du = run_json(url, "du")
    assert du["logical_bytes"] == len(data) + 5
    cfg = run_json(url, "config")
    assert cfg["url"] == {"value": url, "source": "argument"}
    assert cfg["workers"]["source"] == "default"
    assert run_json(url, "rm", "ns", "a") == {"namespace": "ns", "key": "a", "deleted": True}


def test_config_command_shows_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Path("castore.toml").write_text('url = "memory://from-file"\nworkers = 3\n')
    monkeypatch.setenv("CASTORE_CACHE_SIZE", "1G")
    cfg = json.loads(run(None, "config", "--json").stdout)
    assert cfg["url"]["value"] == "memory://from-file" and cfg["url"]["source"].endswith("castore.toml")
    assert cfg["workers"]["value"] == 3
    assert cfg["cache_size"] == {"value": 1 << 30, "source": "environment CASTORE_CACHE_SIZE"}
    text = run("memory://x", "--cache-dir", str(tmp_path / "layer"), "config")
    assert text.exit_code == 0
    line = next(ln for ln in text.stdout.splitlines() if ln.startswith("cache_dir"))
    assert str(tmp_path / "layer") in line and "(argument)" in line


# -- exit codes -------------------------------------------------------------------------------------------
def test_exit_code_1_for_misses(url: str) -> None:
    for args in (["get", "ns", "absent", "-"], ["get", "ns", "absent", "somewhere"], ["stat", "ns", "absent"],
                 ["rm", "ns", "absent"], ["verify", "ns", "absent"]):
        result = run(url, *args)
        assert result.exit_code == 1, (args, result.output)
        assert "no such key" in result.stderr
        assert "Traceback" not in result.stderr
    assert not Path("somewhere").exists()


def test_exit_code_2_for_usage_and_bad_input(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for args in (["put", "ns", "..", "-"], ["get", "ns", "a/b"], ["stat", "bad:ns", "k"], ["put", "ns", "k", "-", "--meta", "novalue"],
                 ["put", "ns", "k", "/definitely/not/here"], ["frobnicate"], ["get"]):
        result = run(url, *args, input=b"x")
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output
    bad_url = run("ftp://nowhere", "ls")
    assert bad_url.exit_code == 2 and "unsupported store URL" in bad_url.stderr
    monkeypatch.setenv("CASTORE_CACHE_SIZE", "lots")
    bad_env = run(url, "ls")
    assert bad_env.exit_code == 2 and "cache_size" in bad_env.stderr


def test_exit_code_3_when_verify_finds_a_flipped_byte(file_url: str, tmp_path: Path) -> None:
    data = _rand(300_000, seed=5)
    put = json.loads(run(file_url, "put", "ns", "k", "-", "--json", input=data).stdout)
    assert run(file_url, "verify").exit_code == 0
    st = json.loads(run(file_url, "stat", "ns", "k", "--json").stdout)
    assert st["chunks"] == put["chunks"]
    chunk_files = sorted((tmp_path / "store" / keys.ROOT / "chunks").rglob("*"))
    chunk_files = [p for p in chunk_files if p.is_file()]
    assert len(chunk_files) == put["chunks"]
    victim = chunk_files[len(chunk_files) // 2]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    victim.write_bytes(bytes(raw))
    for args in (["verify"], ["verify", "ns"], ["verify", "ns", "k"]):
        result = run(file_url, *args, "--json")
        assert result.exit_code == 3, (args, result.output)
        report = json.loads(result.stdout)
        assert report["ok"] is False and any(victim.name in b for b in report["bad"])
    text = run(file_url, "verify")
    assert text.exit_code == 3 and "FAILED" in text.stdout
    # get never writes wrong bytes: it fails with exit code 3 and a warning.
    got = run(file_url, "get", "ns", "k", "out.bin")
    assert got.exit_code == 3
    assert "failed verification" in got.stderr
    assert not Path("out.bin").exists()
    assert run(file_url, "get", "ns", "k", "-").stdout_bytes == b""


def test_exit_code_4_for_backend_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run(f"file://{blocker}/store", "ls")
    assert result.exit_code == 4, result.output
    assert result.stderr.startswith("castore: error:") and len(result.stderr.strip().splitlines()) == 1


def test_exit_code_5_when_read_only(url: str) -> None:
    assert run(url, "put", "ns", "k", "-", input=b"data").exit_code == 0
    for args in (["put", "ns", "k2", "-"], ["rm", "ns", "k"]):
        result = CliRunner().invoke(main, ["--url", url, "--read-only", *args], input=b"x")
        assert result.exit_code == 5, (args, result.output)
        assert "read-only" in result.stderr
    ro = CliRunner().invoke(main, ["--url", url, "--read-only", "get", "ns", "k", "-"])
    assert ro.exit_code == 0 and ro.stdout_bytes == b"data"


def test_verbose_shows_traceback(url: str) -> None:
    quiet = run(url, "stat", "ns", "..")
    assert quiet.exit_code == 2 and "Traceback" not in quiet.stderr
    loud = run(url, "-v", "stat", "ns", "..")
    assert loud.exit_code == 2 and "Traceback" in loud.stderr and "InvalidKeyError" in loud.stderr


def test_help_documents_exit_codes() -> None:
    result = run(None, "--help")
    assert result.exit_code == 0
    for code in ("0  success", "1  miss", "2  usage", "3  verification", "4  backend", "5  the store is read-only"):
        assert code in result.stdout


def test_commands_added_elsewhere_get_the_same_error_handling(url: str) -> None:
    @click.command("explode")
    @click.pass_context
    def explode(ctx: click.Context) -> None:
        common.open_cli_store(ctx)
        raise BackendError("the bucket is on fire")

    main.add_command(explode)
    try:
        result = run(url, "explode")
    finally:
        main.commands.pop("explode")
    assert result.exit_code == 4
    assert result.stderr.strip() == "castore: error: the bucket is on fire"


# -- du ---------------------------------------------------------------------------------------------------
def test_du_ratios_match_what_was_put(url: str) -> None:
    blob = _rand(500_000, seed=6)
    text = b"".join(b"kernel_%d = triton.compile(src)\n" % (i % 40) for i in range(30_000))
    for key in ("r1", "r2", "r3"):
        assert run(url, "put", "ns", key, "-", input=blob).exit_code == 0
    assert run(url, "put", "txt", "t", "-", input=text).exit_code == 0
    du = run_json(url, "du")
    assert du["manifests"] == 4
    assert du["logical_bytes"] == 3 * len(blob) + len(text)
    assert du["referenced_bytes"] == len(blob) + len(text)
    assert du["dedup_ratio"] == pytest.approx((3 * len(blob) + len(text)) / (len(blob) + len(text)), rel=1e-3)
    assert du["stored_bytes"] < len(blob) + len(text) // 5
    assert du["compression_ratio"] == pytest.approx(du["logical_bytes"] / du["stored_bytes"], rel=1e-3)
    ns = run_json(url, "du", "ns")
    assert ns["logical_bytes"] == 3 * len(blob)
    assert ns["dedup_ratio"] == pytest.approx(3.0, rel=1e-3)
    assert run_json(url, "du", "txt")["compression_ratio"] > 5
    human = run(url, "du")
    assert human.exit_code == 0 and "dedup ratio" in human.stdout


# -- progress bars ----------------------------------------------------------------------------------------
def test_progress_bars_only_on_a_tty_without_json(monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = click.Context(main)
    ctx.params = {"as_json": False}
    monkeypatch.setattr(common, "_stderr_is_tty", lambda: False)
    with common.progress_bar(ctx, 10, "x") as bar:
        assert bar is None
    monkeypatch.setattr(common, "_stderr_is_tty", lambda: True)
    with common.progress_bar(ctx, 10, "x") as bar:
        assert callable(bar)
        bar(10)
    ctx.params = {"as_json": True}
    with common.progress_bar(ctx, 10, "x") as bar:
        assert bar is None


def test_no_progress_output_when_stderr_is_not_a_tty(url: str) -> None:
    result = run(url, "put", "ns", "big", "-", input=_rand(3 << 20, seed=7))
    assert result.exit_code == 0 and result.stderr == ""


# -- a real process ---------------------------------------------------------------------------------------
def _castore_commands() -> list[list[str]]:
    commands = [[sys.executable, "-m", "castore"]]
    script = Path(sys.executable).parent / "castore"
    if script.exists():
        commands.append([str(script)])
    return commands


@pytest.mark.parametrize("command", _castore_commands(), ids=lambda c: Path(c[-1]).name)
def test_subprocess_round_trip_and_exit_codes(command: list[str], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASTORE_")}
    env["CASTORE_URL"] = f"file://{tmp_path / 'store'}"

    def proc(*args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*command, *args], input=data, capture_output=True, env=env, timeout=60, check=False)

    data = _rand(200_000, seed=8)
    put = proc("put", "ns", "k", "-", "--json", data=data)
    assert put.returncode == 0, put.stderr
    assert json.loads(put.stdout)["size"] == len(data)
    got = proc("get", "ns", "k", "-")
    assert got.returncode == 0 and got.stdout == data
    assert got.stderr == b""
    miss = proc("stat", "ns", "nope")
    assert miss.returncode == 1 and miss.stderr.decode().strip() == "castore: error: ns/nope: no such key"
    assert proc("get", "ns", "../etc").returncode == 2
    assert proc("--read-only", "rm", "ns", "k").returncode == 5
    ls = proc("ls", "--json")
    [row] = json.loads(ls.stdout)
    assert (row["namespace"], row["key"]) == ("ns", "k") and row["manifest_bytes"] > 0
    assert proc("verify").returncode == 0
    assert proc("rm", "ns", "k").returncode == 0
    assert proc("rm", "ns", "k").returncode == 1
