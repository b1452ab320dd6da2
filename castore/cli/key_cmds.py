"""Commands about signing keys: keygen."""

from __future__ import annotations

from typing import Any

import click

from castore.cli.common import emit, json_option


@click.command("keygen")
@click.argument("name")
@click.option(
    "--out",
    "out_dir",
    default=".",
    show_default=True,
    metavar="DIR",
    type=click.Path(file_okay=False, path_type=str),
    help="Directory to write NAME.key and NAME.pub into.",
)
@json_option
@click.pass_context
def keygen(ctx: click.Context, name: str, out_dir: str, as_json: bool) -> None:
    """Make an ed25519 key pair for signing entries: DIR/NAME.key (secret, mode 0600) and DIR/NAME.pub.

    Prints the public key (NAME:BASE64). Give NAME.key to the writers only (CI: signing_key = "path/NAME.key")
    and the public key to every reader (trusted_keys = ["NAME:BASE64"]). Existing files are never overwritten.
    """
    from castore.signing import SecretKey, write_key_pair

    key = SecretKey.generate(name)
    secret_path, public_path = write_key_pair(key, out_dir)
    data = {"name": key.name, "public_key": key.public.text(), "secret_key_file": str(secret_path), "public_key_file": str(public_path)}

    def render(d: dict[str, Any]) -> str:
        click.echo(f"castore: wrote {d['secret_key_file']} (secret: keep it with the writers) and {d['public_key_file']}", err=True)
        return d["public_key"]

    emit(ctx, data, render)


COMMANDS = [keygen]
