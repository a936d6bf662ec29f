"""Drift: reference statistics written at register, and PSI gauges that shifted inputs move and unshifted ones don't."""

import json
import subprocess
import sys

import numpy as np
import pytest
import requests
from conftest import ADMIN, ADMIN_KEY, ROOT, basic_auth, exported
from sklearn.datasets import load_iris
from sklearn.linear_model import LinearRegression

from app.artifacts import ModelError
from app.drift import EPSILON, Window
from app.registry import load_model, save_model

# Conventional PSI reading: under 0.1 no real change, over 0.25 a major shift. The tests hold the seeded samples to
# those bands, well clear of the boundaries.
STABLE, SHIFTED = 0.1, 0.25
IRIS = load_iris().data


def iris_sample(n: int, seed: int, shift: dict[int, float] | None = None) -> list[list[float]]:
    """n training rows drawn with replacement (iris's values are ties at one decimal: noise would move them across
    the decile edges), some columns shifted by a constant."""
    rng = np.random.default_rng(seed)
    rows = IRIS[rng.integers(0, len(IRIS), n)]
    for column, by in (shift or {}).items():
        rows[:, column] += by
    return rows.round(3).tolist()


def send(client, rows: list, route: str = "/predict") -> None:
    """Predict rows, asserting 200."""
    r = client.post(route, json={"features": rows}, headers=basic_auth())
    assert r.status_code == 200, r.json


def feature_psi(feature: str, model: str = "iris", version: str = "1") -> float | None:
    """The exported PSI of one feature."""
    return exported("sibyl_feature_drift_psi", model=model, version=version, feature=feature)


FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def test_demo_model_ships_reference_statistics(iris_path):
    """The demo's metadata holds decile bins per feature (training shares summing to 1) and class frequencies."""
    ref = json.loads(iris_path.with_suffix(".json").read_text())["reference"]
    assert [f["name"] for f in ref["features"]] == FEATURES and ref["rows"] == 150
    for feature in ref["features"]:
        assert len(feature["fractions"]) == len(feature["edges"]) + 1 <= 10
        assert abs(sum(feature["fractions"]) - 1) < 1e-9
    assert ref["classes"] == {"setosa": 1 / 3, "versicolor": 1 / 3, "virginica": 1 / 3}
    assert set(ref["predictions"]["classes"]) == {"setosa", "versicolor", "virginica"}


def test_unshifted_inputs_keep_psi_low(make_app):
    """Rows drawn from the training data keep every feature's PSI and the prediction PSI under 0.1."""
    client = make_app(DRIFT_WINDOW=500).test_client()
    send(client, iris_sample(500, seed=1))
    for feature in FEATURES:
        assert feature_psi(feature) < STABLE, feature
    assert exported("sibyl_prediction_drift_psi", model="iris", version="1") < STABLE


def test_shifted_feature_moves_its_psi_and_the_window_slides_back(make_app):
    """Shifting petal_length raises its PSI past 0.25 and moves the predictions' out of the stable band (the model
    leans on it), while the others stay low; a window's worth of unshifted rows brings it back under 0.1."""
    client = make_app(DRIFT_WINDOW=300).test_client()
    send(client, iris_sample(300, seed=2, shift={2: 1.5}))
    assert feature_psi("petal_length") > SHIFTED
    assert feature_psi("sepal_length") < STABLE and feature_psi("sepal_width") < STABLE
    assert exported("sibyl_prediction_drift_psi", model="iris", version="1") > STABLE
    for seed in range(3, 6):  # in batches: the ring drops the oldest rows as new ones arrive
        send(client, iris_sample(100, seed=seed))
    assert feature_psi("petal_length") < STABLE


def test_no_gauge_before_the_window_holds_enough_rows(make_model, make_app):
    """A worker reports no PSI from a handful of rows (noise, not drift): only from min(DRIFT_WINDOW, 100) on."""
    path = make_model(LinearRegression(), name="fresh", classify=False, reference=_reference(2))
    client = make_app(MODEL_PATH=str(path)).test_client()
    send(client, [[0.1, 0.2]] * 99)
    assert exported("sibyl_prediction_drift_psi", model="fresh", version="1") is None
    send(client, [[0.1, 0.2]])
    assert exported("sibyl_prediction_drift_psi", model="fresh", version="1") > SHIFTED  # one value, 100 times


def test_cache_hits_count_for_drift(make_app, redis_url):
    """Rows the cache answers are live traffic too: the window counts them."""
    app = make_app(REDIS_URL=redis_url)
    client = app.test_client()
    rows = iris_sample(50, seed=7)
    send(client, rows)
    r = client.post("/predict", json={"features": rows}, headers=basic_auth())
    assert r.headers["X-Cache"] == "HIT"
    (window,) = app.extensions["sibyl.drift"].windows.values()
    assert window.held == 100


def _reference(n_features: int) -> tuple[np.ndarray, None]:
    """The seeded rows make_model fits on, as reference data."""
    return np.random.default_rng(0).normal(size=(200, n_features)), None


def test_regressor_prediction_psi_uses_training_prediction_quantiles(make_model, make_app):
    """A regressor's predictions are binned by its training predictions' deciles: inputs shifted along the model's
    weights move the prediction PSI, inputs from the training distribution don't."""
    path = make_model(LinearRegression(), name="reg", classify=False, reference=_reference(2))
    ref = json.loads(path.with_suffix(".json").read_text())["reference"]
    assert "classes" not in ref and len(ref["predictions"]["edges"]) == 9
    client = make_app(MODEL_PATH=str(path), DRIFT_WINDOW=400).test_client()
    rng = np.random.default_rng(11)
    send(client, rng.normal(size=(400, 2)).tolist())
    assert exported("sibyl_prediction_drift_psi", model="reg", version="1") < STABLE
    send(client, (rng.normal(size=(400, 2)) + 1.0).tolist())
    assert exported("sibyl_prediction_drift_psi", model="reg", version="1") > SHIFTED
    assert exported("sibyl_feature_drift_psi", model="reg", version="1", feature="0") > SHIFTED


def test_model_without_reference_has_no_drift_metrics(make_model, make_app):
    """No reference in the metadata: GET /models says so, and no drift series is exported for it."""
    from sklearn.linear_model import LogisticRegression

    path = make_model(LogisticRegression(), name="noref")
    client = make_app(MODEL_PATH=str(path)).test_client()
    send(client, np.random.default_rng(3).normal(size=(200, 2)).tolist())
    (model,) = client.get("/models", headers=basic_auth()).json["models"]
    assert model["versions"][0]["reference"] is False
    assert exported("sibyl_prediction_drift_psi", model="noref") is None
    assert exported("sibyl_feature_drift_psi", model="noref") is None
    iris = make_app().test_client().get("/models", headers=basic_auth()).json["models"][0]
    assert iris["versions"][0]["reference"] is True


def test_drift_window_zero_turns_drift_off(make_app):
    """DRIFT_WINDOW=0: no window is kept for any model."""
    app = make_app(DRIFT_WINDOW=0)
    send(app.test_client(), iris_sample(10, seed=1))
    assert app.extensions["sibyl.drift"].windows == {}


def test_ring_counts_are_the_last_window_rows(iris_path):
    """After batches of every size (larger than the window too), the counts are exactly the bins of the last
    DRIFT_WINDOW rows, and PSI is computed from them; a value equal to a cut point is binned as searchsorted's
    side="right" bins it (in the bin above), on the small-batch path and the numpy one."""
    model = load_model(iris_path)
    window = Window(model, 37)
    rng = np.random.default_rng(5)
    X = np.empty((0, 4))
    labels: list = []
    # Rows made of the reference's own cut points: row r holds each feature's r-th (cycling).
    cuts = np.array([[e[r % len(e)] for e in window.edges] for r in range(20)])
    noisy = [IRIS[rng.integers(0, 150, k)] + rng.normal(0, 0.5, (k, 4)) for k in [1, 5, 36, 2, 40, 80, 3, 37, 1]]
    for batch in [*noisy, cuts, cuts[:3]]:
        k = len(batch)
        predicted = rng.choice(model.classes, k).tolist()
        window.observe(batch, predicted)
        X, labels = np.vstack([X, batch])[-37:], [*labels, *predicted][-37:]
        expected = []
        for j, edges in enumerate(window.edges):
            expected.append(np.bincount(np.searchsorted(edges, X[:, j], side="right"), minlength=window.width))
        expected.append(np.bincount(np.searchsorted(window.classes, labels), minlength=window.width))
        assert (window.counts.reshape(5, -1) == np.array(expected)).all(), k
    live = np.maximum(np.array(expected) / 37, EPSILON)
    assert np.allclose(window.psi(), ((live - window.expected) * np.log(live / window.expected)).sum(axis=1))


def test_bad_reference_in_metadata_is_refused_with_one_line(iris_path, tmp_path):
    """A reference that does not fit the model stops its load, naming the metadata file."""
    path = tmp_path / "iris.joblib"
    path.write_bytes(iris_path.read_bytes())
    meta = json.loads(iris_path.with_suffix(".json").read_text())
    meta["reference"]["features"] = meta["reference"]["features"][:3]
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="one entry per feature"):
        load_model(path)


def test_register_reference_csv_with_target(tmp_path):
    """`register --reference data.csv --target species` stores bins in the model's feature order (CSV columns in
    any order) and the target's class frequencies; a missing column is one line."""
    from sklearn.linear_model import LogisticRegression

    y = np.where(IRIS[:, 2] > 3, "big", "small")
    names = ["a", "b", "c", "d"]
    model = LogisticRegression(max_iter=500).fit(IRIS, y)
    path = tmp_path / "m.joblib"
    save_model(model, path, name="m", version="1", feature_names=names)
    csv = tmp_path / "train.csv"
    lines = ["species,d,c,b,a", *(f"{t},{r[3]},{r[2]},{r[1]},{r[0]}" for t, r in zip(y, IRIS))]
    csv.write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "app.cli", "register", str(path), "--features", ",".join(names)]
    run = subprocess.run([*cmd, "--reference", csv, "--target", "species"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    ref = json.loads(path.with_suffix(".json").read_text())["reference"]
    assert [f["name"] for f in ref["features"]] == names
    assert ref["features"][0]["edges"] == np.unique(np.quantile(IRIS[:, 0], np.linspace(0, 1, 11)[1:-1])).tolist()
    assert ref["classes"] == {"big": np.mean(y == "big"), "small": np.mean(y == "small")}
    csv.write_text("species,d,c,b\n" + "\n".join(f"{t},{r[3]},{r[2]},{r[1]}" for t, r in zip(y, IRIS)) + "\n")
    run = subprocess.run([*cmd, "--reference", csv, "--target", "species"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0 and run.stderr.splitlines() == [
        "Error: the reference has no column 'a' (columns: d, c, b)"
    ]


def test_metrics_endpoint_serves_drift_in_one_process_and_under_gunicorn(make_app, live_server):
    """GET /metrics carries the drift gauges: from the default registry in one process, and from the workers'
    multiprocess files under gunicorn; shifted rows show as a high PSI in the scrape itself."""
    admin = basic_auth(ADMIN, ADMIN_KEY)
    client = make_app(DRIFT_WINDOW=100).test_client()
    send(client, iris_sample(100, seed=7, shift={2: 1.5}))
    text = client.get("/metrics", headers=admin).text
    assert _scraped_psi(text, "petal_length") > SHIFTED

    server = live_server(env={"DRIFT_WINDOW": "100"}, workers=1)
    rows = iris_sample(100, seed=8, shift={2: 1.5})
    r = requests.post(server.url + "/predict", json={"features": rows}, headers=basic_auth(), timeout=10)
    assert r.status_code == 200
    scrape = requests.get(server.url + "/metrics", headers=admin, timeout=10)
    assert scrape.status_code == 200 and _scraped_psi(scrape.text, "petal_length") > SHIFTED


def _scraped_psi(text: str, feature: str) -> float:
    """A feature's PSI for iris 1 in a /metrics body."""
    for line in text.splitlines():
        if line.startswith("sibyl_feature_drift_psi{") and f'feature="{feature}"' in line and 'model="iris"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no PSI for {feature} in the scrape")
