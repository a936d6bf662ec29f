"""Operator commands, run with no app (so no users or model needed): `python -m app.cli create-user NAME` etc."""

import csv
import json
import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import click
import numpy as np
from flask import Flask

from app.artifacts import ModelError, artifact_kind, open_artifact, parse_trusted_types, refuse_world_writable
from app.auth import DEV_MARKER, ROLES, new_api_key
from app.errors import StartupError
from app.registry import (
    ARTIFACTS,
    MANIFEST,
    NAME,
    artifact_in,
    check_manifest,
    metadata_path,
    model_folders,
    raw_manifest,
    read_manifest,
    read_metadata,
    scan_dir,
    version_folders,
    version_key,
    write_manifest,
    write_metadata,
)
from config import Config

# The running service reads MODEL_DIR only when it (re)loads, so every registry change ends with this.
ROLL_OUT = "roll it out: kill -HUP <gunicorn master pid> or POST /admin/reload"
model_dir_option = click.option(
    "--model-dir", type=click.Path(file_okay=False), help="The registry folder (default: the MODEL_DIR setting)."
)


@click.command("create-user")
@click.argument("name")
@click.option("--file", "users_file", type=click.Path(dir_okay=False), help="Append the entry to this users file.")
@click.option("--dev", is_flag=True, help="Mark the file as development-only (SIBYL_ENV=production refuses it).")
@click.option(
    "--role",
    type=click.Choice(ROLES),
    default="predict",
    help="admin may also manage models and users; metrics may read GET /metrics.",
)
def create_user(name: str, users_file: str | None, dev: bool, role: str) -> None:
    """Create a user with a random API key; print the key once and the line to put in the config."""
    if ":" in name or "," in name or not name.strip():
        raise click.BadParameter("a user name may not be empty or contain ':' or ','", param_hint="NAME")
    key, digest = new_api_key()
    entry = f"{name}:sha256:{digest}" + ("" if role == "predict" else f":{role}")
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
@click.option("--name", help="Copy ARTIFACT into MODEL_DIR/NAME/VERSION/ (without it: metadata beside ARTIFACT).")
@click.option("--version", "version", help="Model version (needed with --name; beside ARTIFACT the default is 1).")
@click.option("--alias", "aliases", multiple=True, help="Point this alias at the new version (repeatable).")
@click.option("--features", help="Comma-separated feature names, if the model wasn't fitted on a DataFrame.")
@click.option(
    "--reference",
    type=click.Path(exists=True, dir_okay=False),
    help="Training data for drift monitoring: a .csv with a header row (feature names) or a 2-D .npy.",
)
@click.option("--target", help="The reference's target column: a header name (.csv) or a column number (.npy).")
@model_dir_option
def register(
    artifact: str,
    name: str | None,
    version: str | None,
    aliases: tuple[str, ...],
    features: str | None,
    reference: str | None,
    target: str | None,
    model_dir: str | None,
) -> None:
    """Check a model you trust as startup would, then copy it into MODEL_DIR/NAME/VERSION/ with its metadata."""
    path = Path(artifact)
    names = [f.strip() for f in features.split(",")] if features else None
    trusted = parse_trusted_types(Config.SKOPS_TRUSTED_TYPES)
    placed = _placed(Path(model_dir or Config.MODEL_DIR), path)  # before _root: a loose artifact needs no MODEL_DIR
    if target is not None and reference is None:
        raise click.UsageError("--target names a column of --reference; give both")
    try:
        data = read_reference(Path(reference), target) if reference else None
        if placed is None and name is None:
            _register_beside(path, version or "1", aliases, names, trusted, data)
        else:
            _register_in(_root(model_dir), path, placed, name, version, aliases, names, trusted, data)
    except (StartupError, OSError) as e:
        raise click.ClickException(str(e)) from None


def read_reference(path: Path, target: str | None) -> "Reference":
    """Training rows (and the target column, when named) from a .csv with a header row or a 2-D .npy; for a CSV,
    the header names the columns, which are matched to the model's feature names when it has them."""
    if path.suffix.lower() == ".npy":
        array = np.load(path, allow_pickle=False)
        if array.ndim != 2:
            raise StartupError(f"reference {path} must hold a 2-D array (rows x columns)")
        if target is None:
            return Reference(None, array, None)
        try:
            column = int(target)
            y = array[:, column]
        except (ValueError, IndexError):
            shown = f"--target {target!r} must be a column number of {path} ({array.shape[1]} columns)"
            raise StartupError(shown) from None
        return Reference(None, np.delete(array, column, axis=1), y)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise StartupError(f"reference {path} must be a CSV with a header row and at least one data row")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    if target is not None and target not in header:
        raise StartupError(f"--target {target!r} is not a column of {path} (columns: {', '.join(header)})")
    if any(len(row) != len(header) for row in body):
        raise StartupError(f"reference {path}: every row must have as many values as the header ({len(header)})")
    keep = [i for i, h in enumerate(header) if h != target]
    try:
        X = np.array([[float(row[i]) for i in keep] for row in body])
    except ValueError:
        raise StartupError(f"reference {path}: feature columns must hold numbers") from None
    y = np.array([row[header.index(target)].strip() for row in body]) if target is not None else None
    return Reference([header[i] for i in keep], X, y)


class Reference(NamedTuple):
    """Training data for a model's reference statistics: column names (CSV), feature rows, the target or None."""

    columns: list[str] | None
    X: np.ndarray
    y: np.ndarray | None

    def for_model(self, estimator: object, names: list[str] | None) -> tuple[np.ndarray, np.ndarray | None]:
        """The rows in the model's feature order, and the target in its class labels' types."""
        X = self.X
        fitted = getattr(estimator, "feature_names_in_", None)
        wanted = names or (None if fitted is None else [str(n) for n in fitted])
        if self.columns is not None and wanted is not None:
            missing = [n for n in wanted if n not in self.columns]
            if missing:
                raise ModelError(f"the reference has no column {missing[0]!r} (columns: {', '.join(self.columns)})")
            X = X[:, [self.columns.index(n) for n in wanted]]
        y = self.y
        classes = getattr(estimator, "classes_", None)
        if y is not None and classes is not None:
            by_text = {str(c): c for c in np.asarray(classes).tolist()}
            y = np.array([by_text.get(str(v), str(v)) for v in y.tolist()], dtype=object)
        elif y is not None:
            try:
                y = y.astype(np.float64)
            except ValueError:
                raise ModelError("the reference's target must hold numbers for a regressor") from None
        return X, y


def _reference(estimator: object, names: list[str] | None, data: Reference | None) -> tuple | None:
    """write_metadata's reference argument from the data read, or None."""
    return data.for_model(estimator, names) if data is not None else None


def _register_beside(
    path: Path,
    version: str,
    aliases: tuple[str, ...],
    names: list[str] | None,
    trusted: list[str],
    data: Reference | None = None,
) -> None:
    """Write the metadata beside a loose artifact, named after the file, for MODEL_PATH (the command before
    MODEL_DIR)."""
    if aliases:
        raise click.ClickException("--alias needs --name: aliases live in MODEL_DIR/NAME/manifest.json")
    # Opening a .joblib runs code: this is the one place Sibyl opens an unverified artifact, at your request.
    estimator = open_artifact(path, trusted)
    meta = write_metadata(estimator, path, path.stem, version, names, reference=_reference(estimator, names, data))
    click.echo(f"wrote {metadata_path(path)}: {meta['name']} {meta['version']}, {meta['n_features']} features")
    click.echo(f"serve it with: MODEL_PATH={path} make run")


def _register_in(
    root: Path,
    path: Path,
    placed: tuple[str, str] | None,
    name: str | None,
    version: str | None,
    aliases: tuple[str, ...],
    names: list[str] | None,
    trusted: list[str],
    data: Reference | None = None,
) -> None:
    """Register into MODEL_DIR: copy the artifact into NAME/VERSION/, or, if it already sits there, write its
    metadata beside it; then move the aliases to it."""
    if placed is not None and (name or placed[0], version or placed[1]) != placed:
        raise click.ClickException(f"{path} sits in {placed[0]}/{placed[1]}; --name and --version must match that")
    name, version = placed or (name, version)
    if version is None:
        raise click.ClickException("--version is needed with --name: the new folder is MODEL_DIR/NAME/VERSION")
    folder = root / _valid("model name", name)
    target = folder / _valid("version", version)
    for alias in aliases:
        _valid("alias", alias)
    if placed is None and (target.exists() or target.is_symlink()):
        raise click.ClickException(f"{target} already exists: register under a new version (nothing was changed)")
    versions = sorted({*(version_folders(folder) if folder.is_dir() else ()), version}, key=version_key)
    # Before anything is written: the manifest must still pass startup's checks with the new version (an alias of
    # the same name would not) and with the aliases moved to it.
    manifest = _manifest(folder, versions)
    if aliases:
        manifest["aliases"] = {**manifest.get("aliases", {}), **dict.fromkeys(aliases, version)}
    default = check_manifest(manifest, folder / MANIFEST, versions)["default"]
    if placed is None:
        meta = _copy_in(path, root, name, version, names, trusted, data)
    else:
        estimator = open_artifact(path, trusted)
        meta = write_metadata(estimator, path, name, version, names, reference=_reference(estimator, names, data))
    try:
        if aliases:
            write_manifest(folder / MANIFEST, manifest, versions)
    except OSError as e:  # the version is in place by now: say so, rather than suggest nothing happened
        raise click.ClickException(f"registered {target}, but could not write its aliases ({e}); run `alias`") from None
    pointed = f", aliases: {', '.join(aliases)}" if aliases else ""
    click.echo(
        f"registered {name} version {version} at {target / meta['artifact']} ({meta['n_features']} features{pointed}; "
        f"default version: {default}); {ROLL_OUT}"
    )


def _copy_in(
    path: Path,
    root: Path,
    name: str,
    version: str,
    names: list[str] | None,
    trusted: list[str],
    data: Reference | None = None,
) -> dict:
    """Copy an artifact into root/name/version/ with its metadata, checked as startup would; the folder appears
    whole or not at all. Return the metadata."""
    kind = artifact_kind(path)
    refuse_world_writable(path)  # anyone could have replaced what is about to be copied
    # A dot name, which the scanner skips, on MODEL_DIR's filesystem, so the rename below is atomic.
    staging = Path(tempfile.mkdtemp(prefix=".register-", dir=root))
    try:
        staged = staging / version
        staged.mkdir()
        copy = staged / f"model{kind}"
        shutil.copyfile(path, copy)
        # Readable by the service's user, writable by no one else (mkdtemp's folder is private to its maker).
        for made, mode in ((copy, 0o644), (staged, 0o755), (staging, 0o755)):
            made.chmod(mode)
        try:
            # The copy is what gets checked and hashed: the bytes that will be served, whatever the source does next.
            estimator = open_artifact(copy, trusted)
            reference = _reference(estimator, names, data)
            meta = write_metadata(estimator, copy, name, version, names, reference=reference)
        except ModelError as e:
            raise ModelError(str(e).replace(str(copy), str(path))) from None
        if (root / name).is_dir():
            os.rename(staged, root / name / version)
        else:
            # A new model appears with its version inside: a scan never meets an empty model folder.
            os.rename(staging, root / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


@click.command("list")
@model_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document, for scripts.")
def list_models(model_dir: str | None, as_json: bool) -> None:
    """Every model's versions, default, aliases, traffic and metadata problems, read from metadata and manifests
    alone (no artifact is opened)."""
    root = _root(model_dir)
    models = [_describe(folder) for folder in model_folders(root)]
    if as_json:
        click.echo(json.dumps({"model_dir": str(root), "models": models}, indent=2))
        return
    if not models:
        click.echo(f"no models in {root}")
        return
    rows = [("MODEL", "VERSION", "DEFAULT", "ALIASES", "TRAFFIC", "PROBLEM")]
    for model in models:
        if model["problem"]:
            rows.append((model["name"], "-", "", "", "", model["problem"]))
        for v in model["versions"]:
            default = "yes" if v["version"] == model["default"] else ""
            traffic = "" if v["traffic"] is None else str(v["traffic"])
            rows.append((model["name"], v["version"], default, ",".join(v["aliases"]), traffic, v["problem"] or ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]).rstrip())


def _describe(folder: Path) -> dict:
    """One model as the registry would serve it, without opening an artifact; problems as startup would say them."""
    versions = version_folders(folder)
    model = {"name": folder.name, "default": None, "aliases": {}, "traffic": {}, "cache": None, "problem": None}
    try:
        if not versions:
            raise StartupError(f"model folder {folder} has no version folders")
        model |= read_manifest(folder / MANIFEST, list(versions), Config.CACHE_POLICY)
    except StartupError as e:
        model["problem"] = str(e)
    model["versions"] = [
        {
            "version": version,
            "aliases": sorted(alias for alias, target in model["aliases"].items() if target == version),
            "traffic": model["traffic"].get(version),
            "problem": _metadata_problem(folder.name, version, sub),
        }
        for version, sub in versions.items()
    ]
    return model


def _metadata_problem(name: str, version: str, folder: Path) -> str | None:
    """What startup would refuse in a version folder, judged from its metadata and the artifact's presence alone."""
    artifact = artifact_in(folder)
    meta_file = metadata_path(artifact)
    if not artifact.exists():
        return f"no {' or '.join(ARTIFACTS)}"
    if not meta_file.is_file():
        return f"no metadata {meta_file.name} (register writes it)"
    try:
        meta = read_metadata(meta_file)
    except ModelError as e:
        return str(e).replace(str(meta_file), meta_file.name)
    if missing := [key for key in ("name", "version", "sha256") if not meta.get(key)]:
        return f"metadata {meta_file.name} has no {missing[0]!r}"
    if (meta["name"], str(meta["version"])) != (name, version):
        return f"metadata says {meta['name']} version {meta['version']}, not its folders' {name}/{version}"
    return None


@click.command("alias")
@click.argument("name")
@click.argument("version", required=False)
@click.argument("alias", required=False)
@click.option("--delete", "deleted", metavar="ALIAS", help="Remove this alias instead.")
@model_dir_option
def alias(name: str, version: str | None, alias: str | None, deleted: str | None, model_dir: str | None) -> None:
    """Point alias ALIAS of model NAME at VERSION (`alias NAME VERSION ALIAS`), or remove one (`--delete ALIAS`)."""
    if (deleted is None) == (version is None or alias is None) or (deleted and version):
        raise click.UsageError("give VERSION ALIAS, or --delete ALIAS alone")
    folder, versions = _model(_root(model_dir), name)
    try:
        manifest = _manifest(folder, versions)
        aliases = manifest.setdefault("aliases", {})
        if deleted is not None:
            if deleted not in aliases:
                shown = ", ".join(sorted(aliases)) or "none"
                raise click.ClickException(f"model {name} has no alias {deleted!r} (aliases: {shown})")
            was = aliases.pop(deleted)
            done = f"removed alias {deleted} (was version {was})"
        else:
            _valid("alias", alias)
            if alias in versions:
                raise click.ClickException(f"{alias!r} is a version of {name}; an alias must not be a version's name")
            _version(name, version, versions)
            was = aliases.get(alias)
            aliases[alias] = version
            done = f"alias {alias} -> version {version}" + (f" (was {was})" if was and was != version else "")
        if not aliases:
            del manifest["aliases"]
        write_manifest(folder / MANIFEST, manifest, versions)
    except StartupError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{name}: {done} in {folder / MANIFEST}; {ROLL_OUT}")


@click.command("default")
@click.argument("name")
@click.argument("version")
@model_dir_option
def default(name: str, version: str, model_dir: str | None) -> None:
    """Make VERSION the version model NAME's default route answers with."""
    folder, versions = _model(_root(model_dir), name)
    _version(name, version, versions)
    try:
        manifest = _manifest(folder, versions) | {"default": version}
        write_manifest(folder / MANIFEST, manifest, versions)
    except StartupError as e:
        raise click.ClickException(str(e)) from None
    # With a traffic split, the default route draws by weight and the default only names the fallback.
    split = "; note: its traffic split still decides the default route" if manifest.get("traffic") else ""
    click.echo(f"{name}: default version {version} in {folder / MANIFEST}{split}; {ROLL_OUT}")


def _root(model_dir: str | None) -> Path:
    """The registry folder: --model-dir, else the MODEL_DIR setting; ClickException if it does not exist."""
    root = Path(model_dir or Config.MODEL_DIR)
    if not root.is_dir():
        raise click.ClickException(f"model folder {root} does not exist (pass --model-dir or set MODEL_DIR)")
    return root


def _valid(what: str, value: str) -> str:
    """value, if it is a valid registry name (one URL path segment, as the scanner requires)."""
    if not NAME.fullmatch(value):
        raise click.ClickException(f"{what} {value[:64]!r} is not a valid name: it must match {NAME.pattern}")
    return value


def _model(root: Path, name: str) -> tuple[Path, list[str]]:
    """A registered model's folder and version names; ClickException if there is no such model."""
    folder = root / _valid("model name", name)
    versions = list(version_folders(folder)) if folder.is_dir() else []
    if not versions:
        raise click.ClickException(f"no model {name!r} in {root} (`list` shows the models)")
    return folder, versions


def _version(name: str, version: str, versions: list[str]) -> None:
    """ClickException unless version is one of the model's version folders."""
    if version not in versions:
        raise click.ClickException(f"model {name} has no version {version!r} (versions: {', '.join(versions)})")


def _manifest(folder: Path, versions: list[str]) -> dict:
    """A model's manifest as written (absent: {}), once it passes startup's checks against these versions."""
    manifest = raw_manifest(folder / MANIFEST)
    check_manifest(manifest, folder / MANIFEST, versions)
    return manifest


def _placed(root: Path, artifact: Path) -> tuple[str, str] | None:
    """(name, version) when the artifact already is root/<name>/<version>/model.joblib or model.skops."""
    if artifact.name not in ARTIFACTS or not root.is_dir():
        return None
    # The file itself is not resolved: a model.joblib linked from elsewhere still sits in its version folder.
    folder = artifact.absolute().parent.resolve()
    return (folder.parent.name, folder.name) if folder.parent.parent == root.resolve() else None


@click.command("curl")
@click.argument("artifact", required=False, type=click.Path(dir_okay=False))
@click.option("--model-dir", type=click.Path(file_okay=False), help="A MODEL_DIR, instead of one artifact.")
@click.option("--name", help="With --model-dir: the model (default: the only one, else the first by name).")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="Where Sibyl listens.")
@click.option("--user", "credentials", default="USER:KEY", show_default=True, help="user:key for basic auth.")
@click.option(
    "--cacert", type=click.Path(dir_okay=False), help="A certificate curl is to trust (HTTPS with TLS_CERT_FILE)."
)
def curl(
    artifact: str | None, model_dir: str | None, name: str | None, url: str, credentials: str, cacert: str | None
) -> None:
    """Print a curl command that predicts a sample row of a model, built from its metadata (nothing unpickled)."""
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
        meta = read_metadata(meta_file)
    except ModelError as e:
        raise click.ClickException(str(e)) from None
    names = meta.get("feature_names")
    width = len(names) if names else meta.get("n_features") or 1  # metadata from before n_features: a 400 says
    row = (meta.get("sample_rows") or [None])[0] or [0.0] * width
    # Named rows show the caller which value is which; a model without names takes a plain list.
    instance = dict(zip(names, row)) if names else row
    body = json.dumps({"instances": [instance]})
    click.echo(
        f"  curl -u {shlex.quote(credentials)}{f' --cacert {shlex.quote(cacert)}' if cacert else ''}"
        " -X POST -H 'Content-Type: application/json' \\\n"
        f"    -d {shlex.quote(body)} {url}{route}"
    )


@click.command("postman")
@model_dir_option
@click.option("--out", default="postman", show_default=True, type=click.Path(file_okay=False), help="Folder to write.")
def postman(model_dir: str | None, out: str) -> None:
    """Write the Postman collection and environment generated from GET /openapi.json of the registry in MODEL_DIR."""
    from app import postman as generator  # imports the app: only this command needs it

    try:
        made = generator.files(str(_root(model_dir)))
    except StartupError as e:
        raise click.ClickException(str(e)) from None
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in made.items():
        (folder / name).write_text(text)
        click.echo(f"wrote {folder / name}")
    count = len(generator.items(json.loads(made[generator.COLLECTION_FILE])))
    collection = folder / generator.COLLECTION_FILE
    click.echo(f"{count} requests; import both into Postman, or run them: npx newman run {collection} -e ...")


@click.group()
def main() -> None:
    """Sibyl operator commands that need no running app."""


for command in (create_user, register, list_models, alias, default, curl, postman):
    main.add_command(command)


def cli_app() -> Flask:
    """A Flask app holding only these commands, for `flask --app wsgi <command>`: no model, users or Redis needed."""
    app = Flask(__name__)
    for command in main.commands.values():
        app.cli.add_command(command)
    return app


if __name__ == "__main__":
    main()
