"""Operator commands: `flask create-user NAME` (or `python -m app.cli create-user NAME`)."""

from pathlib import Path

import click

from app.auth import DEV_MARKER, new_api_key


@click.command("create-user")
@click.argument("name")
@click.option("--file", "users_file", type=click.Path(dir_okay=False), help="Append the entry to this users file.")
@click.option("--dev", is_flag=True, help="Mark the file as development-only (SIBYL_ENV=production refuses it).")
def create_user(name: str, users_file: str | None, dev: bool) -> None:
    """Create a user with a random API key; print the key once and the line to put in the config."""
    if ":" in name or "," in name or not name.strip():
        raise click.BadParameter("a user name may not be empty or contain ':' or ','", param_hint="NAME")
    key, digest = new_api_key()
    entry = f"{name}:sha256:{digest}"
    if users_file:
        path = Path(users_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = f"{DEV_MARKER}\n" if dev and not path.exists() else ""
        with open(path, "a") as f:
            f.write(f"{header}{entry}\n")
        path.chmod(0o600)
    click.echo(f"user: {name}\nkey:  {key}\n(the key is shown once; only its SHA-256 digest is stored)")
    click.echo(f"config entry (SIBYL_USERS or a line of SIBYL_USERS_FILE): {entry}")


@click.group()
def main() -> None:
    """Sibyl operator commands that need no running app."""


main.add_command(create_user)

if __name__ == "__main__":
    main()
