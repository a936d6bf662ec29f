"""Opening artifacts: .skops loads only trusted types, .joblib unpickles, anything else is refused; version checks."""

import json
import logging

import joblib
import numpy as np
import pytest
import sklearn
from conftest import basic_auth
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from app.artifacts import ModelError, check_sklearn_version, open_artifact, parse_trusted_types, save_artifact
from app.registry import save_model

X = np.random.default_rng(0).normal(size=(200, 3))
Y = (X[:, 0] + X[:, 2] > 0).astype(int)
TREE = "sklearn.tree._tree.Tree"  # skops trusts no tree storage by default: crafted node indices can crash predict


def double(x):
    """A step of our own: skops saves it by name and must not import it unless told to trust it."""
    return 2 * np.asarray(x)


DOUBLE = f"{double.__module__}.double"  # the name skops reports, whichever way pytest imported this module


def saved(estimator, path):
    """Fit an estimator on X, Y, save it at path (its suffix picks the format) and return it."""
    estimator.fit(X, Y)
    save_artifact(estimator, path)
    return estimator


def one_line_error(path, trusted=()) -> str:
    """The ModelError message opening path raises, checked to be one line naming the file."""
    with pytest.raises(ModelError) as e:
        open_artifact(path, list(trusted))
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize(
    ("estimator", "trusted"),
    [(make_pipeline(StandardScaler(), LogisticRegression()), []),
     (RandomForestClassifier(n_estimators=5, random_state=0), [TREE])],
    ids=["scaled-logistic", "forest"],
)  # fmt: skip
def test_skops_artifact_predicts_as_the_original(tmp_path, estimator, trusted):
    """A .skops file of scikit-learn's own estimators loads and answers exactly as the fitted original."""
    original = saved(estimator, tmp_path / "model.skops")
    loaded = open_artifact(tmp_path / "model.skops", trusted)
    assert type(loaded) is type(original)
    np.testing.assert_array_equal(loaded.predict(X), original.predict(X))
    np.testing.assert_array_equal(loaded.predict_proba(X), original.predict_proba(X))


def test_forest_needs_its_tree_type_trusted(tmp_path):
    """skops 0.16 trusts no tree storage by default, so a forest is refused until SKOPS_TRUSTED_TYPES lists it."""
    saved(RandomForestClassifier(n_estimators=2, random_state=0), tmp_path / "forest.skops")
    message = one_line_error(tmp_path / "forest.skops")
    assert f"does not trust by default: {TREE};" in message and f"SKOPS_TRUSTED_TYPES={TREE}" in message


def test_skops_refuses_a_type_it_does_not_trust(tmp_path):
    """A function of our own inside a .skops file is refused, naming it and the setting that would trust it."""
    path = tmp_path / "custom.skops"
    saved(make_pipeline(FunctionTransformer(double), LogisticRegression()), path)
    message = one_line_error(path, trusted=["some.other.Type"])
    assert f"does not trust by default: {DOUBLE};" in message
    assert message.endswith(f"set SKOPS_TRUSTED_TYPES=some.other.Type,{DOUBLE}")


def test_skops_loads_a_type_listed_in_the_setting(tmp_path):
    """The same file loads once SKOPS_TRUSTED_TYPES names its type, and predicts as the original."""
    path = tmp_path / "custom.skops"
    original = saved(make_pipeline(FunctionTransformer(double), LogisticRegression()), path)
    loaded = open_artifact(path, parse_trusted_types(f" numpy.sort , {DOUBLE},,"))
    np.testing.assert_array_equal(loaded.predict(X), original.predict(X))


def test_many_untrusted_types_are_cut_to_one_short_line(tmp_path):
    """Past five refused types the line names the first five (sorted) and how many more, not the whole list."""
    steps = [FunctionTransformer(f) for f in (np.sort, np.round, np.nan_to_num, np.fliplr, np.flipud, double)]
    path = tmp_path / "many.skops"
    saved(make_pipeline(*steps, LogisticRegression()), path)
    message = one_line_error(path)
    names = sorted(["numpy.sort", "numpy.round", "numpy.nan_to_num", "numpy.fliplr", "numpy.flipud", DOUBLE])
    assert f"does not trust by default: {', '.join(names[:5])} and 1 more;" in message
    assert names[5] not in message and "SKOPS_TRUSTED_TYPES" in message and len(message) < 500


@pytest.mark.parametrize(
    ("name", "content"),
    [("model.skops", b"not a zip file"),
     ("model.joblib", b"not a pickle"),
     ("model.skops", b"PK\x03\x04 a cut zip")],
    ids=["skops", "joblib", "truncated-skops"],
)  # fmt: skip
def test_corrupt_artifact_is_one_line(tmp_path, name, content):
    """A file that isn't what its name says stops with one line naming it."""
    (tmp_path / name).write_bytes(content)
    assert "could not be loaded: " in one_line_error(tmp_path / name)


def test_joblib_artifact_still_loads(tmp_path):
    """.joblib files open as before (a pickle: the trust list does not apply to them)."""
    original = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, Y)
    joblib.dump(original, tmp_path / "model.joblib")
    np.testing.assert_array_equal(open_artifact(tmp_path / "model.joblib", []).predict(X), original.predict(X))


@pytest.mark.parametrize("name", ["model.pkl", "model", "model.onnx"])
def test_unknown_extension_is_refused_unopened(tmp_path, name):
    """Only .skops and .joblib are opened: a pickle under another name is refused, not unpickled."""
    joblib.dump(LogisticRegression().fit(X, Y), tmp_path / name)
    assert "is neither .skops nor .joblib" in one_line_error(tmp_path / name)


def test_world_writable_artifact_is_refused(tmp_path):
    """Anyone could replace a world-writable file, so it isn't opened in either format."""
    path = tmp_path / "model.skops"
    saved(LogisticRegression(), path)
    path.chmod(0o666)
    assert "is world-writable" in one_line_error(path)


def test_saving_under_an_unknown_extension_is_refused(tmp_path):
    """save_artifact writes only the formats open_artifact reads."""
    with pytest.raises(ModelError, match=r"is neither \.skops nor \.joblib"):
        save_artifact(LogisticRegression(), tmp_path / "model.pkl")
    assert not (tmp_path / "model.pkl").exists()


@pytest.mark.parametrize("meta_version", [sklearn.__version__, None], ids=["same", "unrecorded"])
def test_same_or_unrecorded_sklearn_version_is_silent(tmp_path, caplog, meta_version):
    """Nothing to say when the versions match, or the metadata predates recording one."""
    with caplog.at_level(logging.WARNING):
        check_sklearn_version(meta_version, tmp_path / "m.skops", strict=True)
    assert caplog.records == []


def test_other_sklearn_version_warns_naming_both(tmp_path, caplog):
    """By default a model from another scikit-learn version is served, with one warning naming both versions."""
    with caplog.at_level(logging.WARNING, logger="app.artifacts"):
        check_sklearn_version("1.0.2", tmp_path / "m.skops", strict=False)
    [record] = caplog.records
    assert "1.0.2" in record.getMessage() and sklearn.__version__ in record.getMessage()


def test_strict_sklearn_version_refuses_naming_both_and_the_setting(tmp_path, caplog):
    """STRICT_SKLEARN_VERSION=true turns the warning into a one-line refusal."""
    with pytest.raises(ModelError) as e:
        check_sklearn_version("1.0.2", tmp_path / "m.skops", strict=True)
    message = str(e.value)
    assert "1.0.2" in message and sklearn.__version__ in message and "STRICT_SKLEARN_VERSION=true" in message
    assert "\n" not in message and caplog.records == []


def skops_dir(tmp_path, estimator, name="sk"):
    """A MODEL_DIR holding one .skops version of estimator, fitted on seeded data, with its metadata."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 3))
    estimator.fit(X, (X[:, 0] > 0).astype(int))
    folder = tmp_path / "registry" / name / "1"
    folder.mkdir(parents=True)
    save_model(estimator, folder / "model.skops", name=name, version="1", sample_rows=X[:5])
    return tmp_path / "registry", estimator, X


def test_skops_version_folder_is_served(tmp_path, make_app):
    """A <name>/<version>/model.skops in MODEL_DIR is served, answering as the estimator itself does."""
    root, estimator, X = skops_dir(tmp_path, make_pipeline(StandardScaler(), LogisticRegression()))
    app = make_app(MODEL_PATH="", MODEL_DIR=str(root))
    r = app.test_client().post("/predict", json={"features": X[:20].tolist()}, headers=basic_auth())
    assert r.status_code == 200 and r.json["predictions"] == estimator.predict(X[:20]).tolist()


def test_untrusted_skops_types_stop_startup_until_trusted(tmp_path, make_app):
    """A forest's tree storage is not trusted by default: startup stops with one line naming the type and the
    setting; listed in SKOPS_TRUSTED_TYPES, the same file serves."""
    root, estimator, X = skops_dir(tmp_path, RandomForestClassifier(n_estimators=5, random_state=0))
    with pytest.raises(ModelError) as e:
        make_app(MODEL_PATH="", MODEL_DIR=str(root))
    assert "sklearn.tree._tree.Tree" in str(e.value) and "SKOPS_TRUSTED_TYPES" in str(e.value)
    assert "\n" not in str(e.value)
    app = make_app(MODEL_PATH="", MODEL_DIR=str(root), SKOPS_TRUSTED_TYPES="sklearn.tree._tree.Tree")
    r = app.test_client().post("/predict", json={"features": X[:20].tolist()}, headers=basic_auth())
    assert r.json["predictions"] == estimator.predict(X[:20]).tolist()


def test_strict_sklearn_version_refuses_another_version_at_startup(tmp_path, make_app, capsys):
    """Metadata naming another scikit-learn version warns at startup; STRICT_SKLEARN_VERSION refuses it."""
    root, _, _ = skops_dir(tmp_path, LogisticRegression())
    meta_file = root / "sk" / "1" / "model.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "sklearn_version": "0.24.2"}))
    make_app(MODEL_PATH="", MODEL_DIR=str(root))
    assert "written with scikit-learn 0.24.2 but" in capsys.readouterr().out  # the app's log is on stdout
    with pytest.raises(ModelError, match=r"0\.24\.2.*STRICT_SKLEARN_VERSION|STRICT_SKLEARN_VERSION.*0\.24\.2"):
        make_app(MODEL_PATH="", MODEL_DIR=str(root), STRICT_SKLEARN_VERSION=True)
