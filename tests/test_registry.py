"""Models on disk: the checks startup makes before serving an estimator, shared with `register`."""

import json
import warnings

import joblib
import numpy as np
import pytest
from conftest import basic_auth, fitted_on_names, served_model
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
from sklearn.linear_model import LinearRegression
from sklearn.multioutput import MultiOutputRegressor
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor

from app.registry import ModelError, file_sha256, load_model, save_model

X = np.random.default_rng(0).normal(size=(100, 2))


def dump_with_metadata(estimator, path, **meta):
    """Dump an estimator and hand-write its metadata, as an older `register` or an editor could have."""
    joblib.dump(estimator, path)
    meta = {"name": "m", "version": "1", "sha256": file_sha256(path), "feature_names": None, **meta}
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def ten_a():
    """y = 10*a, fitted on columns a, b: swapping the columns turns every answer into a wrong one."""
    return fitted_on_names(LinearRegression().fit(X, 10 * X[:, 0]), ["a", "b"])


def test_named_rows_follow_the_names_the_estimator_was_fitted_on(make_app, tmp_path):
    """Without --features the fitted names are served, so {"a": 1, "b": 0} means a=1."""
    path = tmp_path / "ten_a.joblib"
    save_model(ten_a(), path, name="ten_a", version="1")
    client = make_app(MODEL_PATH=str(path)).test_client()
    r = client.post("/predict", json={"instances": [{"a": 1, "b": 0}]}, headers=basic_auth())
    assert r.json["predictions"] == [pytest.approx(10.0)]


@pytest.mark.parametrize("names", [["b", "a"], ["x", "y"]], ids=["reordered", "renamed"])
def test_startup_refuses_metadata_names_the_estimator_was_not_fitted_on(tmp_path, names):
    """Metadata names that differ from feature_names_in_ (order included) stop startup, naming both lists."""
    path = dump_with_metadata(ten_a(), tmp_path / "ten_a.joblib", feature_names=names)
    with pytest.raises(ModelError) as e:
        load_model(path)
    message = str(e.value)
    assert "[a, b]" in message and f"[{', '.join(names)}]" in message and str(path) in message
    assert "\n" not in message


def test_registering_fitted_names_in_their_order_is_accepted(tmp_path):
    """The same names in the fitted order are fine."""
    path = tmp_path / "ten_a.joblib"
    save_model(ten_a(), path, name="ten_a", version="1", feature_names=["a", "b"])
    assert load_model(path).feature_names == ["a", "b"]


Y2 = np.column_stack([X[:, 0] > 0, X[:, 1] > 0]).astype(int)
MULTI_OUTPUT = {
    "forest-regressor": RandomForestRegressor(n_estimators=3, random_state=0).fit(X, Y2 * 1.5),
    "forest-classifier": RandomForestClassifier(n_estimators=3, random_state=0).fit(X, Y2),
    "knn-regressor": KNeighborsRegressor(n_neighbors=3).fit(X, Y2 * 1.5),
    "knn-classifier": KNeighborsClassifier(n_neighbors=3).fit(X, Y2),
    "multioutput": MultiOutputRegressor(LinearRegression()).fit(X, Y2 * 1.5),
    "linear": LinearRegression().fit(X, Y2 * 1.5),
}


@pytest.mark.parametrize("kind", MULTI_OUTPUT)
def test_startup_refuses_multi_output_estimators(tmp_path, kind):
    """An estimator fitted on a 2-D y stops startup with one line, whichever way it stores its outputs."""
    path = dump_with_metadata(MULTI_OUTPUT[kind], tmp_path / f"{kind}.joblib")
    with pytest.raises(ModelError, match=r"predicts 2 outputs per row; Sibyl serves single-output estimators only"):
        load_model(path)


def test_multi_output_cannot_be_saved(tmp_path):
    """save_model (and so `register`) refuses before writing anything beside the artifact."""
    path = tmp_path / "multi.joblib"
    with pytest.raises(ModelError, match="outputs per row"):
        save_model(MULTI_OUTPUT["forest-regressor"], path, name="multi", version="1")
    assert not path.with_suffix(".json").exists()


def test_served_named_estimator_does_not_warn_but_others_still_do(make_app, tmp_path):
    """Sibyl's own validated calls skip the feature-name warning; scikit-learn still warns everyone else."""
    path = tmp_path / "ten_a.joblib"
    save_model(ten_a(), path, name="ten_a", version="1")
    app = make_app(MODEL_PATH=str(path), INFERENCE_BACKEND="sklearn")
    model = served_model(app)
    assert not [f for f in warnings.filters if f[1] is not None and "valid feature names" in f[1].pattern]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert model.backend.predict(np.array([[1.0, 0.0]]), proba=False)[0].tolist() == [pytest.approx(10.0)]
        assert not caught
        model.estimator.predict(np.array([[1.0, 0.0]]))
    assert [str(w.message) for w in caught] == [
        "X does not have valid feature names, but LinearRegression was fitted with feature names"
    ]
