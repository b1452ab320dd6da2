"""Signed manifests: keys, signing, the trust policy, and what a reader refuses (unsigned, forged, revoked, moved,
damaged entries), on memory:// and file:// stores, through the CLI, and against SeaweedFS."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import msgpack
import pytest
from click.testing import CliRunner

from castore import open_store
from castore.backends import open_backend
from castore.cli import main
from castore.config import load_config
from castore.errors import ConfigError, FormatError, ManifestError, UntrustedEntryError
from castore.format import keys
from castore.format.manifest import FORMAT_VERSION, Manifest, decode_envelope, signed_message
from castore.signing import PublicKey, SecretKey, TrustPolicy, load_public_keys, load_secret_key, write_key_pair
from castore.store import Store


def _rand(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture(scope="module")
def ci_key() -> SecretKey:
    return SecretKey.generate("ci-1")


@pytest.fixture(scope="module")
def new_key() -> SecretKey:
    return SecretKey.generate("ci-2")


def _backend(kind: str, tmp_path: Path):  # noqa: ANN202
    return open_backend(f"memory://{uuid.uuid4().hex}" if kind == "memory" else f"file://{tmp_path / 'store'}")


@pytest.fixture(params=["memory", "file"])
def backend(request: pytest.FixtureRequest, tmp_path: Path):  # noqa: ANN201
    return _backend(request.param, tmp_path)


def _store(backend, *, signing_key: SecretKey | None = None, trusted: list[SecretKey] = (), require: bool = True) -> Store:  # noqa: ANN001
    policy = TrustPolicy([k.public for k in trusted], require=require) if (trusted or require) else None
    return Store(backend, workers=2, trust=policy, signing_key=signing_key)


# -- keys ------------------------------------------------------------------------------------------------
def test_key_text_round_trips_and_signatures_verify(tmp_path: Path, ci_key: SecretKey) -> None:
    secret_path, public_path = write_key_pair(ci_key, tmp_path)
    assert stat.S_IMODE(os.stat(secret_path).st_mode) == 0o600
    loaded = load_secret_key(secret_path)
    assert loaded.public == ci_key.public
    public_text = public_path.read_text().strip()
    assert public_text.startswith("ci-1:") and PublicKey.parse(public_text) == ci_key.public
    assert load_public_keys([str(public_path)]) == [ci_key.public]
    name, sig = loaded.sign_body(b"body")
    assert name == "ci-1" and len(sig) == 64
    assert ci_key.public.verify(sig, signed_message(b"body"))
    assert not ci_key.public.verify(sig, signed_message(b"bodY"))
    assert not ci_key.public.verify(sig, b"body")  # domain-separated: the bare body is not what was signed
    with pytest.raises(ConfigError, match="not overwriting"):
        write_key_pair(ci_key, tmp_path)


def test_secrets_never_appear_in_reprs_or_errors(tmp_path: Path, ci_key: SecretKey) -> None:
    secret_text = ci_key.text()
    secret_b64 = secret_text.partition(":")[2]
    assert secret_b64 not in repr(ci_key) and secret_b64 not in str(ci_key)
    damaged = secret_text[:-6] + ("AAAA==" if not secret_text.endswith("AAAA==") else "BBBB==")
    bad = tmp_path / "bad.key"
    bad.write_text(damaged)
    with pytest.raises(ConfigError) as info:
        load_secret_key(bad)
    assert secret_b64[:20] not in str(info.value)
    for text in ("no-colon", "bad name:AAAA", "ok:not base64!", "ok:" + "A" * 8):
        with pytest.raises(ConfigError):
            PublicKey.parse(text)


def test_trusted_keys_from_environment_files_and_lists(tmp_path: Path, ci_key: SecretKey, new_key: SecretKey) -> None:
    _, pub_path = write_key_pair(new_key, tmp_path)
    env = {"CASTORE_TRUSTED_KEYS": f"{ci_key.public.text()}, \n {pub_path}", "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    config = load_config(env=env, cwd=tmp_path)
    assert config.require_signatures is True  # the default once keys are configured
    assert [k.name for k in load_public_keys(config.trusted_keys)] == ["ci-1", "ci-2"]
    # A job environment exports each setting as text; reading it back gives the same keys.
    again = load_config(env={"CASTORE_TRUSTED_KEYS": str(config.trusted_keys), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}, cwd=tmp_path)
    assert again.trusted_keys == config.trusted_keys
    (tmp_path / "castore.toml").write_text(f'trusted_keys = ["{ci_key.public.text()}"]\nrequire_signatures = false\n')
    from_file = load_config(env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")}, cwd=tmp_path)
    assert list(from_file.trusted_keys) == [ci_key.public.text()] and from_file.require_signatures is False
    for bad in ("ci:AAAA", str(tmp_path / "missing.pub"), "x:" + "A" * 40, "two words:" + "A" * 43 + "="):
        with pytest.raises(ConfigError):
            load_config(env={"CASTORE_TRUSTED_KEYS": bad, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}, cwd=tmp_path)
    other = SecretKey.generate("ci-1")  # same name, other key
    with pytest.raises(ConfigError, match="two different trusted keys"):
        load_config(env={"CASTORE_TRUSTED_KEYS": f"{ci_key.public.text()},{other.public.text()}", "XDG_CONFIG_HOME": str(tmp_path / "xdg")}, cwd=tmp_path)
    with pytest.raises(ConfigError, match="no trusted_keys"):
        open_store(config=load_config({"url": "memory://x", "require_signatures": True}, env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")}, cwd=tmp_path / "elsewhere"))


def _key_whose_text(name: str, wanted) -> SecretKey:  # noqa: ANN001
    """A key (seeds tried in order, so the same key every run) whose base64 text passes wanted."""
    for i in range(100_000):
        key = SecretKey(name, hashlib.sha256(f"{name}-{i}".encode()).digest())
        if wanted(key.public.text().partition(":")[2]):
            return key
    raise AssertionError("no such key in 100,000 seeds")


def test_keys_whose_base64_holds_or_begins_with_a_slash_are_keys_not_paths(tmp_path: Path) -> None:
    # Base64 uses "/": about one key in 64 begins with it, most hold one. Each must read as a key from the
    # environment, a config file and a .pub file, and still clash with another key of its name.
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    begins = _key_whose_text("ci-1", lambda b64: b64.startswith("/"))
    holds = _key_whose_text("ci-2", lambda b64: "/" in b64[1:] and not b64.startswith("/"))
    both = f"{begins.public.text()},{holds.public.text()}"
    config = load_config(env={**env, "CASTORE_TRUSTED_KEYS": both}, cwd=tmp_path)
    assert list(config.trusted_keys) == [begins.public.text(), holds.public.text()]
    assert [k.raw for k in load_public_keys(config.trusted_keys)] == [begins.public.raw, holds.public.raw]
    (tmp_path / "castore.toml").write_text(f'trusted_keys = ["{begins.public.text()}"]\n')
    assert list(load_config(env=env, cwd=tmp_path).trusted_keys) == [begins.public.text()]
    _, pub_path = write_key_pair(begins, tmp_path / "keys")
    assert [k.raw for k in load_public_keys([str(pub_path)])] == [begins.public.raw]
    other = _key_whose_text("ci-1", lambda b64: b64.startswith("/") and b64 != begins.public.text().partition(":")[2])
    with pytest.raises(ConfigError, match="two different trusted keys"):
        load_config(env={**env, "CASTORE_TRUSTED_KEYS": f"{begins.public.text()},{other.public.text()}"}, cwd=tmp_path)
    # A name:/path entry is still a path: a missing one is an error naming the file, an existing one is read.
    with pytest.raises(ConfigError, match="cannot read public key file"):
        load_config(env={**env, "CASTORE_TRUSTED_KEYS": "ci:/keys/missing"}, cwd=tmp_path)
    (tmp_path / "ci:").mkdir()
    (tmp_path / "ci:" / "ci.pub").write_text(holds.public.text() + "\n")
    assert [k.raw for k in load_public_keys([str(tmp_path / "ci:" / "ci.pub")])] == [holds.public.raw]


# -- the store -------------------------------------------------------------------------------------------
def test_signed_entries_are_read_by_trusting_readers(backend, ci_key: SecretKey) -> None:  # noqa: ANN001
    writer = _store(backend, signing_key=ci_key, trusted=[ci_key])
    writer.put("ns", "small", b"tiny")
    writer.put("ns", "big", _rand(300_000))
    reader = _store(backend, trusted=[ci_key])
    assert reader.get("ns", "small") == b"tiny"
    assert reader.get("ns", "big") == _rand(300_000)
    manifest, verdict, version = reader.inspect("ns", "big")
    assert version == FORMAT_VERSION == 2 and verdict.trusted and verdict.verified_by == "ci-1"
    assert reader.stats.untrusted == 0
    # Readers without keys read signed entries too.
    assert _store(backend, require=False).get("ns", "small") == b"tiny"


def test_rotation_two_trusted_keys_and_revocation(backend, ci_key: SecretKey, new_key: SecretKey, caplog) -> None:  # noqa: ANN001
    _store(backend, signing_key=ci_key).put("ns", "old", b"signed by the old key")
    _store(backend, signing_key=new_key).put("ns", "new", b"signed by the new key")
    both = _store(backend, trusted=[ci_key, new_key])
    assert both.get("ns", "old") == b"signed by the old key"
    assert both.get("ns", "new") == b"signed by the new key"
    revoked = _store(backend, trusted=[new_key])  # ci-1 removed: what it alone signed is refused
    caplog.set_level(logging.DEBUG, logger="castore")
    caplog.clear()
    for _ in range(5):
        assert revoked.get("ns", "old") is None
    assert revoked.get_many("ns", ["old", "new"]) == {"old": None, "new": b"signed by the new key"}
    assert revoked.stats.untrusted == 6 and revoked.stats.misses == 6
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, "one log line per entry, not one per lookup"
    assert "ns/old" in warnings[0].getMessage() and "'ci-1'" in warnings[0].getMessage()


def test_wrong_key_and_forged_signature_are_refused(backend, ci_key: SecretKey) -> None:  # noqa: ANN001
    impostor = SecretKey.generate("ci-1")  # claims the trusted key's name
    _store(backend, signing_key=impostor).put("ns", "forged", b"attacker bytes")
    _store(backend, signing_key=SecretKey.generate("someone")).put("ns", "other", b"attacker bytes")
    for require in (True, False):
        reader = _store(backend, trusted=[ci_key], require=require)
        assert reader.get("ns", "forged") is None  # a failing signature by a trusted name: refused even if not required
        with pytest.raises(UntrustedEntryError, match="does not verify"):
            reader.stat("ns", "forged")
    assert _store(backend, trusted=[ci_key], require=True).get("ns", "other") is None
    assert _store(backend, trusted=[ci_key], require=False).get("ns", "other") == b"attacker bytes"


def test_unsigned_and_legacy_entries_miss_when_signatures_are_required(backend, ci_key: SecretKey) -> None:  # noqa: ANN001
    _store(backend, require=False).put("ns", "unsigned", b"no key")
    legacy = Manifest.from_bytes(_store(backend, require=False).backend.get(keys.manifest_path("ns", "unsigned")), max_size=1 << 20)
    doc = {"format": 1, **msgpack.unpackb(legacy.body_bytes(), raw=False)}
    doc["key"] = "legacy"
    backend.put(keys.manifest_path("ns", "legacy"), msgpack.packb(doc, use_bin_type=True))
    strict = _store(backend, trusted=[ci_key])
    assert strict.get("ns", "unsigned") is None and strict.get("ns", "legacy") is None
    assert strict.stats.untrusted == 2
    lenient = _store(backend, trusted=[ci_key], require=False)
    assert lenient.get("ns", "unsigned") == b"no key" and lenient.get("ns", "legacy") == b"no key"
    assert lenient.inspect("ns", "legacy")[2] == 1


def test_moved_entries_miss(backend, ci_key: SecretKey) -> None:  # noqa: ANN001
    """A valid signed entry copied raw to another key, and re-put under another key by a writer without the
    signing key (get, then put --force), are both refused by a reader that requires signatures."""
    ci = _store(backend, signing_key=ci_key)
    ci.put("ns", "graph-a", b"graph A's compiled code")
    ci.put("ns", "graph-b", b"graph B's compiled code")
    raw = backend.get(keys.manifest_path("ns", "graph-a"))
    backend.put(keys.manifest_path("ns", "graph-b"), raw)  # raw copy: the signature is valid, the key is not
    reader = _store(backend, trusted=[ci_key])
    assert reader.get("ns", "graph-b") is None
    with pytest.raises(UntrustedEntryError, match="moved"):
        reader.stat("ns", "graph-b")
    # Moved entries are refused by readers without keys, too: the key is in the checked body.
    assert _store(backend, require=False).get("ns", "graph-b") is None
    attacker = _store(backend, require=False)  # write access, no key
    attacker.put("ns", "graph-b", attacker.get("ns", "graph-a"), overwrite=True)
    assert reader.get("ns", "graph-b") is None and reader.stats.untrusted >= 2
    assert reader.get("ns", "graph-a") == b"graph A's compiled code"


def test_local_layer_drops_an_untrusted_manifest(tmp_path: Path, ci_key: SecretKey) -> None:
    from castore.local_layer import LocalLayer

    inner = open_backend(f"memory://{uuid.uuid4().hex}")
    _store(inner, require=False).put("ns", "k", b"unsigned")
    layered = LocalLayer(inner, str(tmp_path / "layer"), 1 << 20)
    reader = _store(layered, trusted=[ci_key])
    assert reader.get("ns", "k") is None
    assert not layered.holds(keys.manifest_path("ns", "k"))
    _store(inner, signing_key=ci_key).put("ns", "k", b"now signed", overwrite=True)
    assert reader.get("ns", "k") == b"now signed"  # nothing stale stuck in the layer


def test_checksum_catches_a_damaged_body_without_keys(backend) -> None:  # noqa: ANN001
    store = _store(backend, require=False)
    store.put("ns", "k", b"data", meta={"filename": "a.txt"})
    raw = bytearray(backend.get(keys.manifest_path("ns", "k")))
    at = bytes(raw).index(b"a.txt")
    raw[at] ^= 0x01  # 'a.txt' -> '`.txt': a different file name, still valid msgpack
    backend.put(keys.manifest_path("ns", "k"), bytes(raw))
    with pytest.raises(ManifestError, match="checksum"):
        decode_envelope(bytes(raw))
    assert store.get("ns", "k") is None and store.stats.corrupt == 1


# -- every single-bit flip of real manifests --------------------------------------------------------------
def _three_entries(store: Store, tmp_path: Path) -> list[tuple[str, str]]:
    store.put("ns", "inline-blob", _rand(700, seed=1), meta={"filename": "kernel.so", "mode": 0o755})
    store.put("ns", "chunked-blob", _rand(200_000, seed=2), meta={"artifact": "fx-graph"})
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    for i, mode in enumerate((0o644, 0o755, 0o600)):
        (tree / f"file{i}.py").write_bytes(_rand(40 + i, seed=i))
        os.chmod(tree / f"file{i}.py", mode)
    (tree / "sub" / "launcher.so").write_bytes(_rand(90, seed=9))
    store.put_tree("ns", "tree", tree)
    return [("ns", "inline-blob"), ("ns", "chunked-blob"), ("ns", "tree")]


def _flip_every_bit(writer: Store, reader: Store, entries: list[tuple[str, str]]) -> dict[str, int]:
    """Replace each manifest object by each of its single-bit flips; read it back. A read either fails with a
    typed error / miss, or returns the original manifest and bytes unchanged; anything else is counted 'wrong'."""
    counts = {"tried": 0, "detected": 0, "intact": 0, "wrong": 0}
    backend = writer.backend
    for ns, key in entries:
        path = keys.manifest_path(ns, key)
        original = backend.get(path)
        truth = reader.stat(ns, key)
        data = reader.get(ns, key)
        assert truth is not None and data is not None
        for bit in range(len(original) * 8):
            flipped = bytearray(original)
            flipped[bit // 8] ^= 1 << (bit % 8)
            backend.put(path, bytes(flipped))
            counts["tried"] += 1
            try:
                seen = reader.stat(ns, key)
            except FormatError:
                seen = None
            got = reader.get(ns, key)  # the read path proper: a miss, never an exception
            # A reader remembers an entry it found damaged and stops asking for it: each flip is a fresh process.
            reader._forgive(path)
            if seen is None and got is None:
                counts["detected"] += 1
            elif seen == truth and got == data and (seen.created, seen.writer, seen.meta, seen.files) == (
                truth.created, truth.writer, truth.meta, truth.files
            ):
                counts["intact"] += 1
            else:
                counts["wrong"] += 1
        backend.put(path, original)
    return counts


@pytest.mark.slow
def test_every_single_bit_flip_of_three_manifests_is_detected(tmp_path: Path, ci_key: SecretKey, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="castore")  # one warning per damaged read: tens of thousands here
    report = {}
    backend = open_backend(f"memory://{uuid.uuid4().hex}")
    unsigned = _store(backend, require=False)
    entries = _three_entries(unsigned, tmp_path)
    report["unsigned, reader without keys"] = _flip_every_bit(unsigned, unsigned, entries)

    signed_backend = open_backend(f"memory://{uuid.uuid4().hex}")
    signer = _store(signed_backend, signing_key=ci_key)
    _three_entries(signer, tmp_path / "signed")
    strict = _store(signed_backend, trusted=[ci_key])
    report["signed, reader requiring signatures"] = _flip_every_bit(signer, strict, entries)
    # A reader without keys does not check signature bytes: a flip there leaves the entry exactly as written.
    report["signed, reader without keys"] = _flip_every_bit(signer, _store(signed_backend, require=False), entries)
    print()
    for mode, c in report.items():
        print(f"bit flips of 3 manifests ({mode}): {c['tried']} tried, {c['detected']} detected, "
              f"{c['intact']} returned the entry unchanged, {c['wrong']} wrong")
    for mode, c in report.items():
        assert c["wrong"] == 0, (mode, c)
    assert report["unsigned, reader without keys"]["detected"] == report["unsigned, reader without keys"]["tried"]
    assert report["signed, reader requiring signatures"]["detected"] == report["signed, reader requiring signatures"]["tried"]
    assert report["unsigned, reader without keys"]["tried"] > 5000


# -- the command line ------------------------------------------------------------------------------------
def _cli(env: dict[str, str], *args: str, input: bytes | None = None):  # noqa: A002, ANN202
    return CliRunner().invoke(main, list(args), input=input, env=env, catch_exceptions=False)


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("CASTORE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return {"CASTORE_URL": f"file://{tmp_path / 'store'}"}


def test_cli_keygen_sign_stat_and_moved_entry(tmp_path: Path, cli_env: dict[str, str]) -> None:
    made = _cli(cli_env, "keygen", "ci-1", "--out", str(tmp_path / "keys"))
    assert made.exit_code == 0, made.output
    public = made.stdout.strip()
    assert public.startswith("ci-1:") and (tmp_path / "keys" / "ci-1.pub").read_text().strip() == public
    assert stat.S_IMODE(os.stat(tmp_path / "keys" / "ci-1.key").st_mode) == 0o600
    assert _cli(cli_env, "keygen", "ci-1", "--out", str(tmp_path / "keys")).exit_code == 2  # never overwrites
    ci = {**cli_env, "CASTORE_SIGNING_KEY": str(tmp_path / "keys" / "ci-1.key")}
    fleet = {**cli_env, "CASTORE_TRUSTED_KEYS": public, "CASTORE_READ_ONLY": "1"}
    attacker = dict(cli_env)  # write credentials, no key

    shown = _cli(ci, "config")
    secret = (tmp_path / "keys" / "ci-1.key").read_text().partition(":")[2].strip()
    assert "ci-1.key (key 'ci-1')" in shown.output and secret not in shown.output
    assert _cli(ci, "put", "ns", "graph-a", "-", input=b"graph A").exit_code == 0
    assert _cli(ci, "put", "ns", "graph-b", "-", input=b"graph B").exit_code == 0
    assert _cli(fleet, "get", "ns", "graph-a", "-").stdout_bytes == b"graph A"
    info = json.loads(_cli(fleet, "stat", "ns", "graph-a", "--json").stdout)
    assert (info["format"], info["signed_by"], info["trusted"]) == (2, ["ci-1"], True)
    assert "signed by:   ci-1" in _cli(fleet, "stat", "ns", "graph-a").output

    # The attack of the issue: get one graph's entry, put it under another graph's key.
    stolen = _cli(attacker, "get", "ns", "graph-a", "-").stdout_bytes
    assert _cli(attacker, "put", "--force", "ns", "graph-b", "-", input=stolen).exit_code == 0
    refused = _cli(fleet, "get", "ns", "graph-b", "-")
    assert refused.exit_code != 0 and refused.stdout_bytes == b""
    assert "untrusted entry" in refused.stderr and "unsigned" in refused.stderr
    info = json.loads(_cli(fleet, "stat", "ns", "graph-b", "--json").stdout)
    assert (info["signed_by"], info["trusted"]) == ([], False)


def test_import_castore_and_unsigned_stores_do_not_load_cryptography() -> None:
    code = (
        "import sys, castore\n"
        "s = castore.open_store('memory://x', cache_size=0)\n"
        "s.put('ns', 'k', b'v'); assert s.get('ns', 'k') == b'v'\n"
        "assert 'cryptography' not in sys.modules, 'cryptography imported without keys'\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASTORE_")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# -- against SeaweedFS: entries planted by a bucket writer without the key --------------------------------
@pytest.mark.s3
def test_planted_entries_miss_on_seaweedfs(s3_url: str, tmp_path: Path, ci_key: SecretKey) -> None:
    secret_path, _ = write_key_pair(ci_key, tmp_path / "keys")
    base = {"url": s3_url, "cache_dir": str(tmp_path / "layer")}
    ci = open_store(config=load_config({**base, "signing_key": str(secret_path)}, env={}, cwd=tmp_path))
    attacker = open_store(config=load_config({**base, "cache_dir": str(tmp_path / "attacker")}, env={}, cwd=tmp_path))
    fleet = open_store(config=load_config({**base, "cache_dir": str(tmp_path / "fleet"), "trusted_keys": [ci_key.public.text()], "read_only": True}, env={}, cwd=tmp_path))
    with ci, attacker, fleet:
        ci.put("ns", "fx-a", _rand(50_000, seed=1))
        ci.put("ns", "fx-b", b"B")
        attacker.put("ns", "fx-planted", b"\x80\x04 a pickle that would run code")
        attacker.put("ns", "fx-b", ci.get("ns", "fx-a"), overwrite=True)
        raw = attacker.backend.get(keys.manifest_path("ns", "fx-a"))
        attacker.backend.put(keys.manifest_path("ns", "fx-moved"), raw)
        assert fleet.get("ns", "fx-a") == _rand(50_000, seed=1)
        assert fleet.get_many("ns", ["fx-planted", "fx-b", "fx-moved"]) == {"fx-planted": None, "fx-b": None, "fx-moved": None}
        assert fleet.stats.untrusted == 3
        assert not any(fleet.local.holds(keys.manifest_path("ns", k)) for k in ("fx-planted", "fx-b", "fx-moved"))


def test_torch_session_and_castore_stats_count_untrusted_entries(tmp_path: Path, ci_key: SecretKey) -> None:
    from castore.config import Config
    from castore.torch.session import StoreSession, castore_key

    backend = open_backend(f"memory://{uuid.uuid4().hex}")
    _store(backend, require=False).put("ns", castore_key("planted"), b"attacker bytes")
    _store(backend, signing_key=ci_key).put("ns", castore_key("good"), b"ci bytes")
    config = Config(url="memory://x", cache_dir=str(tmp_path / "cache"))
    session = StoreSession(config, "ns", open_store=lambda: _store(backend, trusted=[ci_key]))
    assert session.get("fx-graph", "planted") is None
    assert session.get("fx-graph", "good") == b"ci bytes"
    assert session.stats.to_dict()["untrusted"] == 1
    assert session.stats.caches["fx-graph"].misses == 1 and session.stats.caches["fx-graph"].get_errors == 0
    session.close()
    data = json.loads(CliRunner().invoke(main, ["--cache-dir", str(tmp_path / "cache"), "stats", "--json"]).output)
    assert data["untrusted"] == 1
    text = CliRunner().invoke(main, ["--cache-dir", str(tmp_path / "cache"), "stats"]).output
    assert "untrusted entries refused" in text and text.rstrip().endswith(": 1")


def test_job_environment_carries_the_keys_to_every_process_of_a_job(tmp_path: Path, ci_key: SecretKey) -> None:
    from castore.torch import job_environment

    secret_path, public_path = write_key_pair(ci_key, tmp_path / "keys")
    xdg = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    config = load_config({"url": "memory://x", "signing_key": str(secret_path), "trusted_keys": [str(public_path)]}, env=xdg, cwd=tmp_path)
    env = job_environment(config, base=xdg)
    child = load_config(env=env, cwd=tmp_path)
    assert (child.signing_key, child.trusted_keys, child.require_signatures) == (str(secret_path), config.trusted_keys, True)
    unsigned = load_config(env=job_environment(load_config({"url": "memory://x"}, env=xdg, cwd=tmp_path), base=xdg), cwd=tmp_path)
    assert (unsigned.signing_key, unsigned.trusted_keys, unsigned.require_signatures) == ("", (), False)


def test_a_manifest_read_twice_is_verified_once(monkeypatch: pytest.MonkeyPatch, ci_key: SecretKey) -> None:
    backend = open_backend(f"memory://{uuid.uuid4().hex}")
    _store(backend, signing_key=ci_key).put("ns", "k", b"v")
    calls = []
    original = PublicKey.verify
    monkeypatch.setattr(PublicKey, "verify", lambda self, sig, msg: calls.append(1) or original(self, sig, msg))
    reader = _store(backend, trusted=[ci_key])
    assert reader.get("ns", "k") == b"v" and reader.get("ns", "k") == b"v" and reader.stat("ns", "k") is not None
    assert len(calls) == 1
    raw = bytearray(backend.get(keys.manifest_path("ns", "k")))
    raw[-1] ^= 1  # the signature's last byte: a new (checksum, name, signature), verified afresh, and refused
    backend.put(keys.manifest_path("ns", "k"), bytes(raw))
    assert reader.get("ns", "k") is None and len(calls) == 2


def test_a_writer_without_the_key_is_warned_once(caplog: pytest.LogCaptureFixture, ci_key: SecretKey) -> None:
    store = _store(open_backend(f"memory://{uuid.uuid4().hex}"), trusted=[ci_key])
    with caplog.at_level(logging.WARNING, logger="castore"):
        store.put("ns", "a", b"1")
        store.put("ns", "b", b"2")
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "unsigned entries" in caplog.records[0].getMessage() and len(caplog.records) == 1


def test_random_damage_to_signed_manifests_and_key_text_gives_typed_errors_only(ci_key: SecretKey) -> None:
    """Seeded fuzzing: random byte edits, truncations and insertions of a signed manifest object, read by a
    reader that requires signatures: typed errors, or (edits that cancel out) the original entry; random key
    text: ConfigError only."""
    from castore.errors import UnsupportedFormatVersion

    backend = open_backend(f"memory://{uuid.uuid4().hex}")
    _store(backend, signing_key=ci_key).put("ns", "k", _rand(3000), meta={"filename": "x.so", "mode": 0o755})
    original = backend.get(keys.manifest_path("ns", "k"))
    truth = Manifest.from_bytes(original, max_size=1 << 20)
    policy = TrustPolicy([ci_key.public], require=True)
    rng = random.Random(13)
    outcomes = {"typed error": 0, "refused": 0, "unchanged": 0}
    for _ in range(3000):
        raw = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            op, at = rng.random(), rng.randrange(len(raw))
            if op < 0.6:
                raw[at] = rng.randrange(256)
            elif op < 0.8:
                del raw[at : at + rng.randint(1, 8)]
            else:
                raw[at:at] = rng.randbytes(rng.randint(1, 8))
        try:
            envelope = decode_envelope(bytes(raw))
            if not policy.check(envelope).trusted:
                outcomes["refused"] += 1
                continue
            got = Manifest.from_envelope(envelope, max_size=1 << 20)
        except (ManifestError, UnsupportedFormatVersion):
            outcomes["typed error"] += 1
            continue
        assert got == truth and (got.meta, got.created) == (truth.meta, truth.created)
        outcomes["unchanged"] += 1
    print(f"\nrandom edits of a signed manifest: {outcomes}")
    assert outcomes["typed error"] + outcomes["refused"] > 2900
    for _ in range(3000):
        text = "".join(rng.choice("ab-._:+/=AZ09 \n\x00é") for _ in range(rng.randint(0, 60)))
        for parse in (PublicKey.parse, SecretKey.parse):
            try:
                parse(text)
            except ConfigError:
                pass
