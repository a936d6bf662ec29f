"""The operator commands, run as an operator would (`python -m app.cli ...`, `flask --app wsgi ...`): register's
checks before anything is written, the registry's folders and manifests they write, and list reading no artifact."""

import json
import os
import pickle
import subprocess
import sys

import joblib
import numpy as np
import pytest
from conftest import ROOT, basic_auth, fitted_on_names
from sklearn.ensemble import RandomForestRegressor
from sklearn.linear_model import LinearRegression, LogisticRegression

from app.artifacts import save_artifact
from app.registry import save_model

X = np.random.default_rng(0).normal(size=(100, 2))


def cli(*args, env=None, runner=("-m", "app.cli")):
    """Run an operator command in a subprocess, as an operator would."""
    cmd = [sys.executable, *runner, *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def register(path, *args):
    """Run `register` as an operator would."""
    return cli("register", path, *args)


def refused(proc, *words):
    """Whether a command failed as expected: non-zero, one "Error: ..." line naming the words, no traceback."""
    lines = proc.stderr.splitlines()
    return (
        proc.returncode != 0
        and len(lines) == 1
        and lines[0].startswith("Error: ")
        and all(w in lines[0] for w in words)
    )


def tree(root):
    """Every path under root, relative, dot names included (a staging folder left behind would show)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def good():
    """A model fitted on columns a, b."""
    return fitted_on_names(LinearRegression().fit(X, 10 * X[:, 0]), ["a", "b"])


def replace_artifact(path, how):
    """Damage a registered artifact, or prepare the arguments that misdescribe it; return the extra CLI args."""
    if how == "not-an-estimator":
        joblib.dump({"coef": [1.0, 2.0]}, path)
    elif how == "unfitted":
        joblib.dump(LogisticRegression(), path)
    elif how == "corrupt":
        path.write_bytes(b"not a pickle")
    elif how == "world-writable":
        path.chmod(0o666)
    elif how == "feature-count":  # a model without names of its own: --features is its only schema
        joblib.dump(LinearRegression().fit(X, X[:, 0]), path)
    elif how == "multi-output":
        joblib.dump(RandomForestRegressor(n_estimators=2, random_state=0).fit(X, X * 2), path)
    return {"feature-count": ["--features", "a,b,c"], "names-differ": ["--features", "b,a"]}.get(how, [])


@pytest.mark.parametrize(
    ("how", "words"),
    [("not-an-estimator", "does not hold a fitted scikit-learn estimator"),
     ("unfitted", "does not hold a fitted scikit-learn estimator"),
     ("corrupt", "could not be loaded"),
     ("world-writable", "is world-writable"),
     ("feature-count", "takes 2 features, but 3 feature names are given"),
     ("names-differ", "was fitted on features [a, b] but is described as [b, a]"),
     ("multi-output", "predicts 2 outputs per row")],
)  # fmt: skip
def test_register_refuses_with_one_line_and_keeps_the_metadata(tmp_path, how, words):
    """An expected failure prints one "Error: ..." line, exits non-zero and leaves the metadata byte-for-byte."""
    path = tmp_path / "model.joblib"
    save_model(good(), path, name="model", version="1")
    before = path.with_suffix(".json").read_bytes()
    args = replace_artifact(path, how)
    proc = register(path, *args)
    assert proc.returncode != 0
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("Error: ")
    assert words in proc.stderr and str(path) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert path.with_suffix(".json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.joblib", "model.json"]


def test_register_uses_the_fitted_names_and_the_app_serves_them(make_app, tmp_path):
    """Without --features the names come from the estimator; named rows then answer right."""
    path = tmp_path / "ten_a.joblib"
    joblib.dump(good(), path)
    proc = register(path, "--version", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    client = make_app(MODEL_PATH=str(path)).test_client()
    r = client.post("/predict", json={"instances": [{"b": 0, "a": 1}]}, headers=basic_auth())
    assert r.json["model"] == {"name": "ten_a", "version": "2"}
    assert r.json["predictions"] == [pytest.approx(10.0)]


def test_printed_curl_fits_a_model_without_names_or_sample_rows(tmp_path, make_app):
    """`app.cli curl` (what make run prints) sends a row of the model's width even when register knew no names
    and no sample rows: pasted, it answers 200."""
    path = tmp_path / "plain.joblib"
    joblib.dump(LinearRegression().fit(np.c_[X, X], X[:, 0]), path)
    assert register(path).returncode == 0
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "curl", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60
    ).stdout
    body = json.loads(out.split(" -d '")[1].split("' ")[0])
    assert body == {"instances": [[0.0, 0.0, 0.0, 0.0]]}
    r = make_app(MODEL_PATH=str(path)).test_client().post("/predict", json=body, headers=basic_auth())
    assert r.status_code == 200


# --- register into MODEL_DIR ---


def serve(make_app, root):
    """An app serving the registry in root."""
    return make_app(MODEL_PATH="", MODEL_DIR=str(root), INFERENCE_BACKEND="sklearn")


def predict(client, path):
    """POST a named row; return the response."""
    return client.post(path, json={"instances": [{"a": 1, "b": 0}]}, headers=basic_auth())


@pytest.fixture
def registry(tmp_path):
    """An empty MODEL_DIR, and the source folder models come from."""
    (tmp_path / "reg").mkdir()
    (tmp_path / "src").mkdir()
    return tmp_path / "reg"


@pytest.mark.parametrize("kind", [".joblib", ".skops"])
def test_register_copies_into_model_dir_and_the_app_serves_it(make_app, registry, kind):
    """register copies the artifact into MODEL_DIR/NAME/VERSION/model.<kind> with its metadata, prints one line
    saying where and how to roll it out, and the app then serves that version."""
    source = registry.parent / "src" / f"trained{kind}"
    save_artifact(LinearRegression().fit(X, 10 * X[:, 0]), source)
    proc = register(source, "--name", "churn", "--version", "3", "--features", "a,b", "--model-dir", registry)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1 and str(registry / "churn" / "3" / f"model{kind}") in proc.stdout
    assert "kill -HUP" in proc.stdout and "POST /admin/reload" in proc.stdout
    assert tree(registry) == sorted(["churn", "churn/3", f"churn/3/model{kind}", "churn/3/model.json"])
    assert (registry / "churn" / "3" / f"model{kind}").read_bytes() == source.read_bytes()
    meta = json.loads((registry / "churn" / "3" / "model.json").read_text())
    assert (meta["name"], meta["version"], meta["artifact"]) == ("churn", "3", f"model{kind}")
    r = predict(serve(make_app, registry).test_client(), "/models/churn/versions/3/predict")
    assert r.status_code == 200, r.json
    assert r.json["model"] == {"name": "churn", "version": "3"} and r.json["predictions"] == [pytest.approx(10.0)]


def test_register_alias_updates_the_manifest_and_the_alias_resolves(make_app, registry):
    """--alias points the alias at the new version in manifest.json, keeping the manifest's other keys."""
    source = registry.parent / "src" / "model.joblib"
    joblib.dump(good(), source)
    assert register(source, "--name", "churn", "--version", "1", "--model-dir", registry).returncode == 0
    (registry / "churn" / "manifest.json").write_text('{"default": "1", "aliases": {"stable": "1"}}')
    proc = register(source, "--name", "churn", "--version", "2", "--alias", "next", "--model-dir", registry)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((registry / "churn" / "manifest.json").read_text())
    assert manifest == {"default": "1", "aliases": {"stable": "1", "next": "2"}}
    client = serve(make_app, registry).test_client()
    assert predict(client, "/models/churn/versions/next/predict").json["model"]["version"] == "2"
    assert predict(client, "/models/churn/predict").json["model"]["version"] == "1"


def test_register_refuses_an_existing_version(registry):
    """An existing NAME/VERSION is never overwritten: one line, and the registered files stay as they were."""
    first, second = registry.parent / "src" / "a.joblib", registry.parent / "src" / "b.joblib"
    joblib.dump(good(), first)
    joblib.dump(fitted_on_names(LinearRegression().fit(X, X[:, 1]), ["a", "b"]), second)
    assert register(first, "--name", "churn", "--version", "1", "--model-dir", registry).returncode == 0
    before = {p: (registry / p).read_bytes() for p in tree(registry) if (registry / p).is_file()}
    proc = register(second, "--name", "churn", "--version", "1", "--model-dir", registry)
    assert refused(proc, "already exists"), proc.stderr
    assert {p: (registry / p).read_bytes() for p in tree(registry) if (registry / p).is_file()} == before


@pytest.mark.parametrize(
    ("args", "words"),
    [(["--name", "../x", "--version", "1"], "model name '../x' is not a valid name"),
     (["--name", "a b", "--version", "1"], "is not a valid name"),
     (["--name", "churn", "--version", ".."], "version '..' is not a valid name"),
     (["--name", "churn", "--version", "1/2"], "is not a valid name"),
     (["--name", "churn", "--version", "1", "--alias", "a/b"], "alias 'a/b' is not a valid name"),
     (["--name", "churn", "--version", "1", "--alias", "1"], "is also a version's name"),
     (["--name", "churn"], "--version is needed"),
     (["--alias", "prod"], "--alias needs --name")],
)  # fmt: skip
def test_register_refuses_bad_names_and_writes_nothing(registry, args, words):
    """A name, version or alias the scanner would skip or startup would refuse is refused before anything is
    written."""
    source = registry.parent / "src" / "model.joblib"
    joblib.dump(good(), source)
    proc = register(source, *args, "--model-dir", registry)
    assert refused(proc, words), proc.stderr
    assert tree(registry) == [] and tree(source.parent) == ["model.joblib"]


@pytest.mark.parametrize(
    ("how", "words", "existing"),
    [("not-an-estimator", "does not hold a fitted scikit-learn estimator", False),
     ("corrupt", "could not be loaded", False),
     ("corrupt", "could not be loaded", True),  # a new version of a registered model: staged differently
     ("world-writable", "is world-writable", False),
     ("feature-count", "takes 2 features, but 3 feature names are given", True),
     ("multi-output", "predicts 2 outputs per row", False)],
)  # fmt: skip
def test_a_refused_model_leaves_no_folder_behind(registry, how, words, existing):
    """A failing check names the source file (not the staging copy) and leaves the registry as it was: no version
    folder, no model folder, no staging folder."""
    source = registry.parent / "src" / "model.joblib"
    joblib.dump(good(), source)
    if existing:
        assert register(source, "--name", "churn", "--version", "1", "--model-dir", registry).returncode == 0
    before = tree(registry)
    args = replace_artifact(source, how)
    proc = register(source, "--name", "churn", "--version", "2", *args, "--model-dir", registry)
    assert refused(proc, words, str(source)), proc.stderr
    assert tree(registry) == before


def test_register_in_place_writes_the_metadata_beside_it(make_app, registry):
    """An artifact already at MODEL_DIR/NAME/VERSION/model.joblib is not copied: its metadata is written beside it,
    named after its folders; --name or --version that disagree with them are refused."""
    folder = registry / "churn" / "4"
    folder.mkdir(parents=True)
    joblib.dump(good(), folder / "model.joblib")
    assert refused(register(folder / "model.joblib", "--version", "5", "--model-dir", registry), "sits in churn/4")
    assert tree(registry) == ["churn", "churn/4", "churn/4/model.joblib"]
    proc = register(folder / "model.joblib", "--model-dir", registry)
    assert proc.returncode == 0, proc.stderr
    assert tree(registry) == ["churn", "churn/4", "churn/4/model.joblib", "churn/4/model.json"]
    assert predict(serve(make_app, registry).test_client(), "/models/churn/predict").json["model"]["version"] == "4"


# --- list, alias, default ---


class Tripwire:
    """Unpickling this creates a file: proof that a command opened the artifact."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_list_reads_metadata_and_manifests_only(make_model_dir, tmp_path):
    """list shows every version with default, aliases, traffic and metadata problems, never opening an artifact: an
    artifact that would run code when unpickled lists fine, and only bad metadata is flagged."""
    root = make_model_dir(
        {"iris": ["1"], "tiny": ["1", "2", "3"]},
        manifests={"tiny": {"default": "1", "aliases": {"stable": "2"}, "traffic": {"2": 90, "3": 10}}},
    )
    marker = tmp_path / "unpickled"
    (root / "tiny" / "3" / "model.joblib").write_bytes(pickle.dumps(Tripwire(marker)))
    (root / "tiny" / "2" / "model.json").write_text('{"name": "other", "version": "2", "sha256": "ab"}')
    (root / "empty").mkdir()
    proc = cli("list", "--model-dir", root)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert rows[0] == ["MODEL", "VERSION", "DEFAULT", "ALIASES", "TRAFFIC", "PROBLEM"]
    assert rows[1][:2] == ["empty", "-"] and "has no version folders" in proc.stdout
    assert rows[2] == ["iris", "1", "yes"]
    assert rows[3] == ["tiny", "1", "yes"]
    assert rows[4][:5] == ["tiny", "2", "stable", "90", "metadata"] and "says other version 2" in proc.stdout
    assert rows[5] == ["tiny", "3", "10"]
    listed = json.loads(cli("list", "--json", "--model-dir", root).stdout)
    tiny = next(m for m in listed["models"] if m["name"] == "tiny")
    assert (tiny["default"], tiny["aliases"], tiny["traffic"]) == ("1", {"stable": "2"}, {"2": 90, "3": 10})
    assert [(v["version"], v["problem"] is None) for v in tiny["versions"]] == [("1", True), ("2", False), ("3", True)]
    assert not marker.exists()


def test_alias_and_default_write_the_manifest_the_app_reads(make_app, make_model_dir):
    """alias sets and deletes an alias, default sets the default version; the manifest keeps its other keys and
    the app resolves what was written."""
    root = make_model_dir({"tiny": ["1", "2"]}, manifests={"tiny": {"cache": "off"}})
    manifest = root / "tiny" / "manifest.json"
    for args in (["alias", "tiny", "1", "stable"], ["default", "tiny", "1"]):
        proc = cli(*args, "--model-dir", root)
        assert proc.returncode == 0 and "POST /admin/reload" in proc.stdout, proc.stderr
    assert json.loads(manifest.read_text()) == {"cache": "off", "aliases": {"stable": "1"}, "default": "1"}
    client = serve(make_app, root).test_client()
    rows = {"features": [[1.0, 2.0]]}
    for path in ("/models/tiny/versions/stable/predict", "/models/tiny/predict"):
        assert client.post(path, json=rows, headers=basic_auth()).json["model"] == {"name": "tiny", "version": "1"}
    assert cli("alias", "tiny", "--delete", "stable", "--model-dir", root).returncode == 0
    assert json.loads(manifest.read_text()) == {"cache": "off", "default": "1"}


@pytest.mark.parametrize(
    ("args", "words"),
    [(["tiny", "9", "next"], "model tiny has no version '9' (versions: 1, 2)"),
     (["tiny", "1", "2"], "'2' is a version of tiny"),
     (["tiny", "1", "a/b"], "alias 'a/b' is not a valid name"),
     (["tiny", "--delete", "nope"], "model tiny has no alias 'nope' (aliases: stable)"),
     (["nothing", "1", "next"], "no model 'nothing'"),
     (["../tiny", "1", "next"], "model name '../tiny' is not a valid name")],
)  # fmt: skip
def test_alias_refuses_and_leaves_the_manifest(make_model_dir, args, words):
    """An alias for a missing version, one named like a version, or a missing alias to delete is refused in one line
    and the manifest is left byte for byte."""
    root = make_model_dir({"tiny": ["1", "2"]}, manifests={"tiny": {"aliases": {"stable": "2"}}})
    before = (root / "tiny" / "manifest.json").read_bytes()
    proc = cli("alias", *args, "--model-dir", root)
    assert refused(proc, words), proc.stderr
    assert (root / "tiny" / "manifest.json").read_bytes() == before


def test_alias_never_writes_a_manifest_startup_refuses(make_model_dir):
    """A manifest startup would already refuse is not rewritten: the command names its problem instead."""
    root = make_model_dir({"tiny": ["1", "2"]}, manifests={"tiny": {"traffic": {"7": 1}}})
    proc = cli("alias", "tiny", "1", "stable", "--model-dir", root)
    assert refused(proc, "'traffic' must name only version folders"), proc.stderr
    assert json.loads((root / "tiny" / "manifest.json").read_text()) == {"traffic": {"7": 1}}


def test_flask_cli_runs_the_commands_in_production_with_no_users_or_model(registry, make_app):
    """`flask --app wsgi <command>` needs no users or model either (create_app would refuse both here): it registers
    from MODEL_DIR, lists, and makes the first production user, whose key then works."""
    env = {**os.environ, "SIBYL_ENV": "production", "SIBYL_USERS": "", "SIBYL_USERS_FILE": "", "MODEL_PATH": ""}
    env["MODEL_DIR"] = str(registry)
    flask = ("-m", "flask", "--app", "wsgi")
    source = registry.parent / "src" / "model.joblib"
    joblib.dump(good(), source)
    proc = cli("register", source, "--name", "churn", "--version", "1", env=env, runner=flask)
    assert proc.returncode == 0, proc.stderr
    assert str(registry / "churn" / "1" / "model.joblib") in proc.stdout
    listed = cli("list", env=env, runner=flask)
    assert listed.returncode == 0 and listed.stdout.splitlines()[1].split() == ["churn", "1", "yes"], listed.stderr
    users = registry.parent / "users"
    made = cli("create-user", "admin", "--role", "admin", "--file", users, env=env, runner=flask)
    assert made.returncode == 0, made.stderr
    key = next(line.split()[1] for line in made.stdout.splitlines() if line.startswith("key:"))
    app = make_app(
        SIBYL_ENV="production", SIBYL_USERS="", SIBYL_USERS_FILE=str(users), MODEL_PATH="", MODEL_DIR=str(registry)
    )
    r = app.test_client().post("/predict", json={"instances": [{"a": 1, "b": 0}]}, headers=basic_auth("admin", key))
    assert r.status_code == 200 and r.json["model"] == {"name": "churn", "version": "1"}
