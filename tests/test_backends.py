"""Compiled ONNX and scikit-learn backends agree on every estimator kind we ship tests for."""

import numpy as np
import pytest
import redis
from conftest import basic_auth
from sklearn.ensemble import (
    GradientBoostingClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from app import backends
from app.registry import ModelError, load_model

ESTIMATORS = {
    "logistic": (LogisticRegression, {}),
    "forest": (RandomForestClassifier, {"n_estimators": 20, "max_depth": 6, "random_state": 0}),
    "boosting": (GradientBoostingClassifier, {"n_estimators": 20, "random_state": 0}),
    "tree": (DecisionTreeClassifier, {"max_depth": 5, "random_state": 0}),
}


def rows(n_features: int, n: int = 200) -> list:
    """Fresh random rows the models were not trained on."""
    return np.random.default_rng(42).normal(scale=1.5, size=(n, n_features)).round(6).tolist()


def predict_both(make_app, path, body):
    """The same request answered by the ONNX app and the scikit-learn app."""
    onnx = make_app(MODEL_PATH=str(path), INFERENCE_BACKEND="onnx")
    sk = make_app(MODEL_PATH=str(path), INFERENCE_BACKEND="sklearn")
    assert onnx.extensions["sibyl.model"].backend.name == "onnx"
    answers = [a.test_client().post("/predict", json=body, headers=basic_auth()).json for a in (onnx, sk)]
    return answers


@pytest.mark.parametrize("kind", [*ESTIMATORS, "scaled-pipeline"])
def test_onnx_matches_sklearn_classifiers(make_app, make_model, kind):
    """Labels identical and probabilities within 1e-5 between backends, on rows unseen at verification."""
    if kind == "scaled-pipeline":
        estimator = make_pipeline(StandardScaler(), LogisticRegression())
    else:
        cls, params = ESTIMATORS[kind]
        estimator = cls(**params)
    path = make_model(estimator, n_features=5, name=kind)
    onnx, sk = predict_both(make_app, path, {"features": rows(5), "probabilities": True})
    assert onnx["predictions"] == sk["predictions"]
    for p_onnx, p_sk in zip(onnx["probabilities"], sk["probabilities"]):
        assert p_onnx.keys() == p_sk.keys()
        assert max(abs(p_onnx[k] - p_sk[k]) for k in p_sk) <= 1e-5


@pytest.mark.parametrize("estimator", [LinearRegression(), RandomForestRegressor(n_estimators=10, random_state=0)])
def test_onnx_matches_sklearn_regressors(make_app, make_model, estimator):
    """Regression values agree to 1e-5 relative."""
    path = make_model(estimator, n_features=3, name=type(estimator).__name__, classify=False)
    onnx, sk = predict_both(make_app, path, {"features": rows(3)})
    np.testing.assert_allclose(onnx["predictions"], sk["predictions"], rtol=1e-5, atol=1e-6)


def test_demo_model_is_compiled_and_agrees(make_app, iris_path):
    """The demo model serves from ONNX under the default (auto) and agrees with scikit-learn."""
    app = make_app()
    assert app.extensions["sibyl.model"].backend.name == "onnx"
    onnx, sk = predict_both(make_app, iris_path, {"features": rows(4), "probabilities": True})
    assert onnx["predictions"] == sk["predictions"]


class Unconvertible(LogisticRegression):
    """A classifier skl2onnx has no converter for."""


@pytest.mark.parametrize(
    "estimator",
    # skl2onnx 1.20 cannot write HistGradientBoosting trees with this protobuf; it must still be served.
    [Unconvertible(), HistGradientBoostingClassifier(max_iter=10, random_state=0)],
    ids=["no-converter", "hist-boosting"],
)
def test_auto_falls_back_and_onnx_refuses(make_app, make_model, capsys, estimator):
    """auto serves scikit-learn (logging why, once); onnx stops startup instead."""
    path = make_model(estimator, name=type(estimator).__name__)
    capsys.readouterr()
    app = make_app(MODEL_PATH=str(path))
    assert app.extensions["sibyl.model"].backend.name == "sklearn"
    assert capsys.readouterr().out.count("ONNX not used") == 1
    r = app.test_client().post("/predict", json={"features": [[1.0, 2.0]]}, headers=basic_auth())
    assert r.status_code == 200
    with pytest.raises(ModelError, match="INFERENCE_BACKEND=onnx"):
        make_app(MODEL_PATH=str(path), INFERENCE_BACKEND="onnx")


def test_disagreeing_conversion_is_not_used(make_app, make_model, monkeypatch):
    """If the compiled model disagrees with scikit-learn on the sample rows, auto keeps scikit-learn."""
    path = make_model(LogisticRegression(), name="disagree")
    real = backends.OnnxBackend.predict

    def off_by_one(self, X, proba):
        labels, p = real(self, X, proba)
        return 1 - labels, p

    monkeypatch.setattr(backends.OnnxBackend, "predict", off_by_one)
    assert make_app(MODEL_PATH=str(path)).extensions["sibyl.model"].backend.name == "sklearn"


def test_compiled_model_is_reused(make_app, make_model, monkeypatch):
    """A restart loads the kept ONNX file (keyed by the artifact's sha256) instead of converting again."""
    path = make_model(LogisticRegression(), name="reuse")
    make_app(MODEL_PATH=str(path))
    assert list((path.parent / ".compiled").glob("*.onnx"))

    def no_conversion(*a, **kw):
        raise AssertionError("converted again")

    monkeypatch.setattr(backends, "_convert", no_conversion)
    assert make_app(MODEL_PATH=str(path)).extensions["sibyl.model"].backend.name == "onnx"


def test_invalid_backend_setting(make_app):
    """A typo in INFERENCE_BACKEND stops startup."""
    with pytest.raises(ModelError, match="INFERENCE_BACKEND"):
        make_app(INFERENCE_BACKEND="fast")


def test_cache_scope_names_precision_and_library_versions(iris_path, monkeypatch):
    """Replicas on other library versions, or a graph of another input precision, never share cache keys."""
    model = load_model(iris_path)
    onnx_bytes = backends._convert(model, np.float64)
    scopes = {backends.OnnxBackend(onnx_bytes, model, dtype).scope for dtype in (np.float32, np.float64)}
    sk = backends.SklearnBackend(model.estimator).scope
    monkeypatch.setattr(backends, "version", lambda lib: "0.0-other")
    upgraded = backends.OnnxBackend(onnx_bytes, model, np.float64).scope
    monkeypatch.setattr(backends.sklearn, "__version__", "0.0-other")
    assert backends.SklearnBackend(model.estimator).scope != sk
    assert len(scopes | {sk, upgraded}) == 4


def test_cache_keys_carry_the_backend_scope(make_app, redis_url):
    """What Redis holds is keyed by the backend's full scope, not only its name."""
    app = make_app(REDIS_URL=redis_url, CACHE_STORE_DELAY_MS=0)
    r = app.test_client().post("/predict", json={"features": [[5.1, 3.5, 1.4, 0.2]]}, headers=basic_auth())
    assert r.status_code == 200
    app.extensions["sibyl.cache"].settle()
    scope = app.extensions["sibyl.model"].backend.scope
    keys = redis.Redis.from_url(redis_url).keys("*")
    assert keys and all(f":{scope}:".encode() in k for k in keys)
