"""examples/: the YAML parses, and every castore command line in the examples is one the CLI accepts.

Docker, GitHub Actions and Kubernetes do not run here; what they run does: tests/test_fleet_story.py drives
`castore prewarm`, `castore pull --into` and the `. env.sh && python ...` start the examples use.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from castore.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FILES = ["Dockerfile", "prewarm-workflow.yml", "kubernetes.yaml"]
# castore, then global options, then a subcommand: up to the end of the shell command it is part of (or of the
# quoted string it starts).
COMMAND = re.compile(r"(?:^|(?P<quote>[\"'])|[\s(])(?P<command>castore\s+[^\n;&|]*)")


def castore_command_lines(text: str) -> list[str]:
    text = re.sub(r"\\\n\s*", " ", text)  # continuation lines
    found = []
    for line in text.splitlines():
        for m in COMMAND.finditer(line):
            command = m.group("command")
            if m.group("quote"):
                command = command.split(m.group("quote"), 1)[0]
            words = command.split()
            if len(words) > 1 and (words[1].startswith("-") or words[1] in main.commands):
                found.append(command.strip())
    return found


def _placeholders(command: str) -> list[str]:
    command = re.sub(r"\$\{\{[^}]*\}\}", "X", command)  # ${{ github expressions }}
    command = re.sub(r"\$\{?\w+\}?", "X", command)  # $VAR, ${VAR}
    return shlex.split(command)


def _parse(argv: list[str]) -> None:
    """The CLI's own parsing of a command line, without running it: global options, subcommand, its options."""
    ctx = main.make_context("castore", argv[1:])
    # What the group left for its subcommand (click 8.2+ keeps the subcommand's name apart, privately).
    name, *rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
    command = main.get_command(ctx, name)
    assert command is not None, f"no castore command {name!r}"
    command.make_context(name, rest, parent=ctx)


def test_every_castore_command_line_in_the_examples_parses() -> None:
    commands = {f: castore_command_lines((EXAMPLES / f).read_text()) for f in FILES}
    assert all(commands.values()), f"a file without castore commands: {commands}"
    subcommands = set()
    for f, lines in commands.items():
        for line in lines:
            argv = _placeholders(line)
            try:
                _parse(argv)
            except click.ClickException as exc:
                pytest.fail(f"{f}: {line!r} is not accepted by the CLI: {exc.format_message()}")
            subcommands.add(next(a for a in argv[1:] if not a.startswith("-") and a != "X"))
    assert {"prewarm", "pull", "run"} <= subcommands, subcommands


def test_a_bad_command_line_would_be_caught() -> None:
    with pytest.raises(click.ClickException):
        _parse(_placeholders("castore pull train --onto /opt/castore"))
    with pytest.raises(click.ClickException):
        _parse(_placeholders("castore prewarm -- python train.py"))  # --name is required


def test_example_yaml_parses() -> None:
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load((EXAMPLES / "prewarm-workflow.yml").read_text())
    assert set(workflow["jobs"]) == {"prewarm", "image"} and workflow["jobs"]["image"]["needs"] == "prewarm"
    kinds = [doc["kind"] for doc in yaml.safe_load_all((EXAMPLES / "kubernetes.yaml").read_text())]
    assert kinds == ["Secret", "ConfigMap", "Job"]


def test_dockerfile_sources_env_sh_written_by_the_pull() -> None:
    text = (EXAMPLES / "Dockerfile").read_text()
    pulls = [c for c in castore_command_lines(text) if " pull " in c]
    into = shlex.split(pulls[0])[shlex.split(pulls[0]).index("--into") + 1]
    assert f". {into}/env.sh" in text
