"""Operator commands, run with no app (so no users or model needed): `python -m app.cli create-user NAME` etc."""

import json
import shlex
from pathlib import Path

import click

from app.auth import DEV_MARKER, ROLES, new_api_key


@click.command("create-user")
@click.argument("name")
@click.option("--file", "users_file", type=click.Path(dir_okay=False), help="Append the entry to this users file.")
@click.option("--dev", is_flag=True, help="Mark the file as development-only (SIBYL_ENV=production refuses it).")
@click.option("--role", type=click.Choice(ROLES), default="predict", help="admin may also manage models and users.")
def create_user(name: str, users_file: str | None, dev: bool, role: str) -> None:
    """Create a user with a random API key; print the key once and the line to put in the config."""
    if ":" in name or "," in name or not name.strip():
        raise click.BadParameter("a user name may not be empty or contain ':' or ','", param_hint="NAME")
    key, digest = new_api_key()
    entry = f"{name}:sha256:{digest}" + (":admin" if role == "admin" else "")
    if users_file:
        path = Path(users_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = f"{DEV_MARKER}\n" if dev and not path.exists() else ""
        with open(path, "a") as f:
            f.write(f"{header}{entry}\n")
        path.chmod(0o600)
    click.echo(f"user: {name}\nkey:  {key}\n(the key is shown once; only its SHA-256 digest is stored)")
    click.echo(f"config entry (SIBYL_USERS or a line of SIBYL_USERS_FILE): {entry}")


@click.command("register")
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", help="Model name (default: the file name).")
@click.option("--version", "version", default="1", show_default=True, help="Model version.")
@click.option("--features", help="Comma-separated feature names, if the model wasn't fitted on a DataFrame.")
def register(artifact: str, name: str | None, version: str, features: str | None) -> None:
    """Check a model you trust as startup would, then write the metadata (sha256, features, classes) beside it."""
    from app.artifacts import ModelError, open_artifact, parse_trusted_types
    from app.registry import write_metadata
    from config import Config

    path = Path(artifact)
    names = [f.strip() for f in features.split(",")] if features else None
    try:
        # Opening a .joblib runs code: this is the one place Sibyl opens an unverified artifact, at your request.
        estimator = open_artifact(path, parse_trusted_types(Config.SKOPS_TRUSTED_TYPES))
        meta = write_metadata(estimator, path, name or path.stem, version, names)
    except (ModelError, OSError) as e:
        raise click.ClickException(str(e)) from None
    n_features = estimator.n_features_in_
    click.echo(f"wrote {path.with_suffix('.json')}: {meta['name']} {meta['version']}, {n_features} features")
    click.echo(f"serve it with: MODEL_PATH={path} make run")


@click.command("curl")
@click.argument("artifact", required=False, type=click.Path(dir_okay=False))
@click.option("--model-dir", type=click.Path(file_okay=False), help="A MODEL_DIR, instead of one artifact.")
@click.option("--name", help="With --model-dir: the model (default: the only one, else the first by name).")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="Where Sibyl listens.")
@click.option("--user", "credentials", default="USER:KEY", show_default=True, help="user:key for basic auth.")
def curl(artifact: str | None, model_dir: str | None, name: str | None, url: str, credentials: str) -> None:
    """Print a curl command that predicts a sample row of a model, built from its metadata (nothing unpickled)."""
    from app.errors import StartupError
    from app.registry import artifact_in, metadata_path, scan_dir

    if (artifact is None) == (model_dir is None):
        raise click.UsageError("give an ARTIFACT or --model-dir, not both")
    route = "/predict"
    if model_dir:
        try:
            plans = scan_dir(Path(model_dir))
        except StartupError as e:
            raise click.ClickException(str(e)) from None
        if name is not None and name not in plans:
            raise click.ClickException(f"no model {name!r} in {model_dir} ({', '.join(sorted(plans))})")
        name = name or min(plans)
        # /predict serves the default model; with several, the model's own route is right whatever DEFAULT_MODEL is.
        route = "/predict" if len(plans) == 1 else f"/models/{name}/predict"
        artifact = artifact_in(plans[name]["versions"][plans[name]["default"]])
    meta_file = metadata_path(Path(artifact))
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise click.ClickException(f"model metadata {meta_file} is unreadable: {e}") from None
    names = meta.get("feature_names")
    width = len(names) if names else meta.get("n_features") or 1  # metadata from before n_features: a 400 says
    row = (meta.get("sample_rows") or [None])[0] or [0.0] * width
    # Named rows show the caller which value is which; a model without names takes a plain list.
    instance = dict(zip(names, row)) if names else row
    body = json.dumps({"instances": [instance]})
    click.echo(
        f"  curl -u {shlex.quote(credentials)} -X POST -H 'Content-Type: application/json' \\\n"
        f"    -d {shlex.quote(body)} {url}{route}"
    )


@click.group()
def main() -> None:
    """Sibyl operator commands that need no running app."""


main.add_command(create_user)
main.add_command(register)
main.add_command(curl)

if __name__ == "__main__":
    main()
