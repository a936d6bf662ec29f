"""`python -m app.cli register`: the checks startup makes, before anything is written."""

import json
import subprocess
import sys

import joblib
import numpy as np
import pytest
from conftest import ROOT, basic_auth, fitted_on_names
from sklearn.ensemble import RandomForestRegressor
from sklearn.linear_model import LinearRegression, LogisticRegression

from app.registry import save_model

X = np.random.default_rng(0).normal(size=(100, 2))


def register(path, *args):
    """Run the command as an operator would."""
    cmd = [sys.executable, "-m", "app.cli", "register", str(path), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


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
