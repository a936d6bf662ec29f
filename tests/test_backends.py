"""Compiled ONNX and scikit-learn backends agree on every estimator kind we ship tests for."""

import json
import os
import signal
import time
import warnings

import numpy as np
import pytest
import redis
from conftest import basic_auth, fitted_on_names, served_model
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
from app.registry import ModelError, file_sha256, load_model, save_model

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
    assert served_model(onnx).backend.name == "onnx"
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
def test_regressor_answers_are_scikit_learns_to_1e9(make_app, tmp_path, estimator):
    """A regressor's value is the answer: served values equal model.predict to 1e-9 relative on fresh rows, from
    a float64 graph or scikit-learn itself, never a float32 graph."""
    X = np.random.default_rng(0).normal(size=(200, 2))
    model = fitted_on_names(estimator.fit(X, X @ [1.0, 2.0] + 0.5), ["a", "b"])
    path = tmp_path / "reg.joblib"
    save_model(model, path, name="reg", version="1", sample_rows=X[:20])
    app = make_app(MODEL_PATH=str(path))
    backend = served_model(app).backend
    assert backend.name == "sklearn" or backend.dtype is np.float64
    fresh = np.array(rows(2))
    body = {"instances": [{"a": a, "b": b} for a, b in fresh.tolist()]}
    answers = app.test_client().post("/predict", json=body, headers=basic_auth()).json["predictions"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an ndarray for a model fitted on names: scikit-learn's warning, not ours
        expected = model.predict(fresh)
    np.testing.assert_allclose(answers, expected, rtol=1e-9, atol=0)


def test_linear_regressor_compiles_to_float64_and_forest_regressor_is_refused(make_app, make_model):
    """Under onnx a linear regressor serves a float64 graph; a forest regressor (whose float64 trees onnxruntime
    can't run) is refused rather than served in float32."""
    path = make_model(LinearRegression(), n_features=3, name="linear", classify=False)
    onnx, sk = predict_both(make_app, path, {"features": rows(3)})
    np.testing.assert_allclose(onnx["predictions"], sk["predictions"], rtol=1e-9, atol=0)
    forest = make_model(RandomForestRegressor(n_estimators=5, random_state=0), n_features=3, name="f", classify=False)
    with pytest.raises(ModelError, match="float64: "):
        make_app(MODEL_PATH=str(forest), INFERENCE_BACKEND="onnx")


def test_demo_model_is_compiled_and_agrees(make_app, iris_path):
    """The demo model serves from ONNX under the default (auto) and agrees with scikit-learn."""
    app = make_app()
    assert served_model(app).backend.name == "onnx"
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
    assert served_model(app).backend.name == "sklearn"
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
    assert served_model(make_app(MODEL_PATH=str(path))).backend.name == "sklearn"


def test_compiled_model_is_reused(make_app, make_model, monkeypatch):
    """A restart loads the kept ONNX file (keyed by the artifact's sha256) instead of converting again."""
    path = make_model(LogisticRegression(), name="reuse")
    make_app(MODEL_PATH=str(path))
    assert list((path.parent / ".compiled").glob("*.onnx"))

    def no_conversion(*a, **kw):
        raise AssertionError("converted again")

    monkeypatch.setattr(backends, "_convert", no_conversion)
    assert served_model(make_app(MODEL_PATH=str(path))).backend.name == "onnx"


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


def test_cache_keys_carry_the_backend_scope(make_app, redis_url, monkeypatch):
    """What Redis holds is keyed by the backend's full scope, not only its name: the same row answered by a
    backend of the same name but another scope (a library upgrade) is a miss stored under a key of its own."""
    app = make_app(REDIS_URL=redis_url, CACHE_LOCAL_ENTRIES=0)
    client, backend = app.test_client(), served_model(app).backend

    def send():
        r = client.post("/predict", json={"features": [[5.1, 3.5, 1.4, 0.2]]}, headers=basic_auth())
        assert r.status_code == 200
        return r.headers["X-Cache"]

    assert [send(), send()] == ["MISS", "HIT"]
    monkeypatch.setattr(backend, "scope", backend.scope.replace(".", ".upgraded-", 1))
    assert [send(), send()] == ["MISS", "HIT"]
    assert redis.Redis.from_url(redis_url).dbsize() == 2


def compiled_files(path):
    """The kept graph and its record for an artifact (one precision was kept)."""
    (graph,) = (path.parent / ".compiled").glob("*.onnx")
    return graph, graph.with_suffix(".json")


def spoil(graph, record, how):
    """Make a kept graph untrustworthy in one of the ways a disk, an attacker or an upgrade would."""
    if how == "tampered":
        data = bytearray(graph.read_bytes())
        data[len(data) // 2] ^= 0x01
        graph.write_bytes(bytes(data))
    elif how == "no-record":
        record.unlink()
    elif how == "foreign-record":
        meta = json.loads(record.read_text())
        record.write_text(json.dumps({**meta, "artifact_sha256": "0" * 64}))
    elif how == "other-versions":
        meta = json.loads(record.read_text())
        record.write_text(json.dumps({**meta, "versions": {**meta["versions"], "onnxruntime": "0.0"}}))


@pytest.mark.parametrize("how", ["tampered", "no-record", "foreign-record", "other-versions"])
def test_untrusted_compiled_graph_is_rebuilt_under_auto(make_app, make_model, capsys, how):
    """A kept graph whose record doesn't vouch for it is converted again (one log line), and the disk is fixed."""
    path = make_model(LogisticRegression(), name=f"kept-{how}")
    make_app(MODEL_PATH=str(path))
    graph, record = compiled_files(path)
    spoil(graph, record, how)
    spoiled = graph.read_bytes()
    capsys.readouterr()
    app = make_app(MODEL_PATH=str(path))
    assert served_model(app).backend.name == "onnx"
    assert capsys.readouterr().out.count("converting again") == 1
    assert json.loads(record.read_text())["graph_sha256"] == file_sha256(graph)
    assert how != "tampered" or graph.read_bytes() != spoiled
    # What was rebuilt is trusted again, even by the strict setting.
    assert served_model(make_app(MODEL_PATH=str(path), INFERENCE_BACKEND="onnx")).backend.name == "onnx"


def test_tampered_compiled_graph_is_refused_under_onnx(make_app, make_model):
    """INFERENCE_BACKEND=onnx never serves, nor silently rebuilds, a graph whose bytes changed after it was recorded."""
    path = make_model(LogisticRegression(), name="strict-tampered")
    make_app(MODEL_PATH=str(path))
    graph, record = compiled_files(path)
    spoil(graph, record, "tampered")
    with pytest.raises(ModelError) as e:
        make_app(MODEL_PATH=str(path), INFERENCE_BACKEND="onnx")
    assert "INFERENCE_BACKEND=onnx" in str(e.value) and str(graph) in str(e.value)
    assert "does not match its record" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("how", ["no-record", "foreign-record", "other-versions"])
def test_stale_compiled_graph_is_rebuilt_under_onnx(make_app, make_model, capsys, how):
    """A graph kept by an earlier release or for other library versions is stale, not tampered: even the strict
    setting converts it again from the pinned artifact (an upgrade must not stop an INFERENCE_BACKEND=onnx start)."""
    path = make_model(LogisticRegression(), name=f"strict-{how}")
    make_app(MODEL_PATH=str(path))
    graph, record = compiled_files(path)
    spoil(graph, record, how)
    capsys.readouterr()
    app = make_app(MODEL_PATH=str(path), INFERENCE_BACKEND="onnx")
    assert served_model(app).backend.name == "onnx"
    assert capsys.readouterr().out.count("converting again") == 1
    assert json.loads(record.read_text())["graph_sha256"] == file_sha256(graph)


def test_world_writable_compiled_graph_is_refused(make_app, make_model):
    """A compiled graph anyone could replace stops startup, as a world-writable artifact does."""
    path = make_model(LogisticRegression(), name="writable")
    make_app(MODEL_PATH=str(path))
    graph, _ = compiled_files(path)
    graph.chmod(0o666)
    with pytest.raises(ModelError, match="world-writable"):
        make_app(MODEL_PATH=str(path))


def test_slow_conversion_is_cut_off(make_app, make_model, monkeypatch, capsys):
    """A conversion past COMPILE_TIMEOUT_SECONDS is killed: auto serves scikit-learn saying why, onnx refuses."""
    path = make_model(LogisticRegression(), name="slow")
    monkeypatch.setattr(backends, "_compile", lambda *a, **kw: time.sleep(600))
    capsys.readouterr()
    app = make_app(MODEL_PATH=str(path), COMPILE_TIMEOUT_SECONDS=1)
    assert served_model(app).backend.name == "sklearn"
    assert "ONNX conversion took longer than COMPILE_TIMEOUT_SECONDS=1 s" in capsys.readouterr().out
    with pytest.raises(ModelError, match="took longer than COMPILE_TIMEOUT_SECONDS=1 s"):
        make_app(MODEL_PATH=str(path), COMPILE_TIMEOUT_SECONDS=1, INFERENCE_BACKEND="onnx")


def unpicklable(*a, **kw):
    """A result the child can't send back."""
    return lambda: None


def raises(*a, **kw):
    """A failure outside _compile's own error handling."""
    raise MemoryError("no room for the graph")


@pytest.mark.parametrize(
    ("child", "words"),
    [(unpicklable, "ONNX conversion failed: AttributeError: Can't pickle local object"),
     (raises, "ONNX conversion failed: MemoryError: no room for the graph"),
     (lambda *a, **kw: os._exit(3), "ONNX conversion process exited with status 3"),
     (lambda *a, **kw: os.kill(os.getpid(), signal.SIGKILL), "ONNX conversion process was killed by SIGKILL")],
    ids=["unpicklable", "raises", "exits", "killed"],
)  # fmt: skip
def test_conversion_child_failure_says_what_happened(make_app, make_model, monkeypatch, child, words):
    """However the conversion child fails, startup under onnx names the real cause, not "process died"."""
    path = make_model(LogisticRegression(), name="crash")
    monkeypatch.setattr(backends, "_compile", child)
    with pytest.raises(ModelError, match="INFERENCE_BACKEND=onnx") as e:
        make_app(MODEL_PATH=str(path), INFERENCE_BACKEND="onnx")
    assert words in str(e.value)
