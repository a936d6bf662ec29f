"""POST /predict contract: request shapes, response shape, probabilities, labels as the model's own."""

import gzip
import json
import zlib

import joblib
import numpy as np
import pytest
import redis
from conftest import IRIS_ROWS, basic_auth
from sklearn.linear_model import LinearRegression, LogisticRegression

NAMED = [
    {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2},
    {"petal_width": 2.3, "petal_length": 5.2, "sepal_width": 3.0, "sepal_length": 6.7},  # any key order
]


def post(client, body, path="/predict", **kw):
    """POST JSON with the test user's credentials."""
    return client.post(path, json=body, headers=basic_auth(), **kw)


def test_seed_example_two_feature_model(make_app, make_model):
    """The seed's exact request against a 2-feature model answers one prediction per row."""
    client = make_app(MODEL_PATH=str(make_model(LogisticRegression()))).test_client()
    r = post(client, {"features": [[1.0, 2.0], [3.0, 4.0]]})
    assert r.status_code == 200
    assert len(r.json["predictions"]) == 2
    assert r.json["model"] == {"name": "tiny", "version": "1"}


def test_predictions_match_the_estimator(client, iris_path):
    """Answers are the model's own predict() output, in request order, with its string labels."""
    expected = joblib.load(iris_path).predict(np.array(IRIS_ROWS)).tolist()
    r = post(client, {"features": IRIS_ROWS})
    assert r.json == {"predictions": expected, "model": {"name": "iris", "version": "1"}}
    assert expected == ["setosa", "virginica"]


@pytest.mark.parametrize(
    "body",
    [
        {"features": IRIS_ROWS},
        {"instances": IRIS_ROWS},
        {"instances": NAMED},
        {"instances": [IRIS_ROWS[0], NAMED[1]]},
        {"data": IRIS_ROWS},
        {"data": NAMED},
    ],
    ids=["features", "instances-lists", "instances-named", "mixed", "data", "data-named"],
)
def test_request_shapes_agree(client, body):
    """Lists, named objects in any key order, and mixes all mean the same rows; "data" is a synonym."""
    assert post(client, body).json["predictions"] == ["setosa", "virginica"]


def test_flat_row_is_one_instance(client):
    """{"features": [a, b, c, d]} is a single instance, not four."""
    assert post(client, {"features": IRIS_ROWS[1]}).json["predictions"] == ["virginica"]


@pytest.mark.parametrize("how", ["body", "query"])
def test_probabilities_map_per_row(client, how):
    """Probabilities come as one {class: p} map per row, from the body flag or ?probabilities=true."""
    if how == "body":
        r = post(client, {"features": IRIS_ROWS, "probabilities": True})
    else:
        r = post(client, {"features": IRIS_ROWS}, query_string={"probabilities": "true"})
    assert r.status_code == 200
    probs = r.json["probabilities"]
    assert len(probs) == 2
    for label, p in zip(r.json["predictions"], probs):
        assert set(p) == {"setosa", "versicolor", "virginica"}
        assert sum(p.values()) == pytest.approx(1.0)
        assert max(p, key=p.get) == label


@pytest.mark.parametrize(("word", "asked"), [("ON", True), ("yes", True), ("1", True), ("off", False), ("", False)])
def test_query_flag_takes_the_settings_words(client, word, asked):
    """?probabilities= reads the words every setting takes (on/off included); empty is absent."""
    r = post(client, {"features": IRIS_ROWS}, query_string={"probabilities": word})
    assert r.status_code == 200 and ("probabilities" in r.json) == asked


def test_query_flag_other_words_are_a_400(client):
    """A word that is neither true nor false is refused, not read as false."""
    r = post(client, {"features": IRIS_ROWS}, query_string={"probabilities": "maybe"})
    assert r.status_code == 400 and "?probabilities=" in r.json["error"]["message"]


def test_probabilities_absent_unless_asked(client):
    """Without the flag the response carries only predictions and model."""
    assert "probabilities" not in post(client, {"features": IRIS_ROWS}).json


def test_integer_labels_stay_integers(make_app, make_model):
    """A model trained on 0/1 labels answers 0/1 numbers, not strings."""
    client = make_app(MODEL_PATH=str(make_model(LogisticRegression(), name="ints"))).test_client()
    r = post(client, {"features": [[3.0, 3.0], [-3.0, -3.0]], "probabilities": True})
    assert r.json["predictions"] == [1, 0]
    assert set(r.json["probabilities"][0]) == {"0", "1"}


def test_regressor_values_and_no_probabilities(make_app, make_model):
    """A regressor returns numbers; asking it for probabilities is a clear 400."""
    path = make_model(LinearRegression(), n_features=3, name="reg", classify=False)
    client = make_app(MODEL_PATH=str(path)).test_client()
    r = post(client, {"features": [[1.0, 1.0, 1.0]]})
    assert r.json["predictions"] == [pytest.approx(6.5)]
    r = post(client, {"features": [[1.0, 1.0, 1.0]], "probabilities": True})
    assert r.status_code == 400
    assert "no probabilities" in r.json["error"]["message"]


def test_models_lists_metadata(client, iris_path):
    """GET /models describes the served model, its backend and nothing on the server's disk."""
    r = client.get("/models", headers=basic_auth())
    (entry,) = r.json["models"]
    assert (entry["name"], entry["default_version"], entry["unavailable"]) == ("iris", "1", [])
    (model,) = entry["versions"]
    assert (model["name"], model["version"]) == ("iris", "1")
    assert model["feature_names"] == ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    assert model["classes"] == ["setosa", "versicolor", "virginica"]
    assert model["backend"] in {"onnx", "sklearn"}
    assert len(model["sha256"]) == 64
    assert "path" not in model and "sample_rows" not in model and str(iris_path.parent) not in r.text


def test_health_and_ready_need_no_auth(client):
    """Probes answer without credentials and reveal nothing about the model."""
    assert client.get("/health").json == {"status": "ok"}
    assert client.get("/ready").json == {"status": "ready", "model": "ok", "cache": "off"}


@pytest.mark.parametrize("encoding", ["gzip", "GZIP", "x-gzip"])
def test_gzip_body_is_accepted(client, encoding):
    """Content-Encoding: gzip bodies are inflated before parsing, several gzip members included."""
    raw = json.dumps({"features": IRIS_ROWS}).encode()
    for data in (gzip.compress(raw), gzip.compress(raw[:10]) + gzip.compress(raw[10:])):
        r = client.post(
            "/predict",
            data=data,
            content_type="application/json",
            headers={**basic_auth(), "Content-Encoding": encoding},
        )
        assert r.status_code == 200
        assert r.json["predictions"] == ["setosa", "virginica"]


def test_deflate_body_is_accepted(client):
    """Content-Encoding: deflate (the zlib format, RFC 9110 8.4.1.2) is inflated too, as tritonclient sends it."""
    data = zlib.compress(json.dumps({"features": IRIS_ROWS}).encode())
    r = client.post(
        "/predict", data=data, content_type="application/json", headers={**basic_auth(), "Content-Encoding": "deflate"}
    )
    assert r.json["predictions"] == ["setosa", "virginica"]


def test_rows_in_two_fields_are_refused(client):
    """Only one of features, instances and data: two would leave which rows count to a guess."""
    r = post(client, {"features": IRIS_ROWS, "data": IRIS_ROWS})
    assert r.status_code == 400 and '"data"' in r.json["error"]["message"]


HUGE = 1.7976931348623157e308  # the largest finite float64: valid input, but a scaler or a sum overflows on it


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("backend", ["sklearn", "onnx"])
@pytest.mark.parametrize("case", ["nan-probabilities", "infinite-value"])
def test_an_answer_that_is_not_a_number_is_a_422(make_app, make_model, redis_url, backend, case):
    """Finite rows the model overflows on (NaN probabilities, an infinite regression value) are refused with a
    documented 422 naming the row, not answered with null; nothing is cached, and the other rows still predict."""
    if case == "nan-probabilities":
        model = {}  # iris: its scaler divides the huge value to infinity
        body = {"features": [IRIS_ROWS[0], [1e-300, 5e16, 7e227, HUGE]], "probabilities": True}
    else:
        model = {"MODEL_PATH": str(make_model(LinearRegression(), name="reg", classify=False))}
        body = {"features": [[1.0, 1.0], [HUGE, HUGE]]}
    client = make_app(INFERENCE_BACKEND=backend, REDIS_URL=redis_url, **model).test_client()
    r = post(client, body)
    assert r.status_code == 422, r.json
    assert r.json["error"]["code"] == "non_finite_answer"
    assert r.json["error"]["message"].startswith("row 1: the model's answer is not a finite number")
    assert "e+" not in r.json["error"]["message"]  # the values sent are not echoed
    assert redis.Redis.from_url(redis_url).keys() == []
    assert post(client, {**body, "features": body["features"][:1]}).status_code == 200
    assert "422" in client.get("/openapi.json").json["paths"]["/predict"]["post"]["responses"]


CSV = "sepal_length,sepal_width,petal_length,petal_width\n5.1,3.5,1.4,0.2\n\n6.7,3.0,5.2,2.3\n"


def post_csv(client, text: str, query: str = "", content_type: str = "text/csv"):
    """POST a CSV body with the test user's credentials."""
    return client.post(f"/predict{query}", data=text, content_type=content_type, headers=basic_auth())


@pytest.mark.parametrize("query", ["", "?probabilities=true"])
def test_csv_body_answers_as_json_rows_do(client, query):
    """A CSV file with a header row (columns in any order, blank lines skipped) is answered exactly as the same rows
    sent as JSON, probabilities included when ?probabilities= asks."""
    r = post_csv(client, CSV, query)
    assert r.status_code == 200, r.json
    assert r.json == post(client, {"features": IRIS_ROWS, "probabilities": bool(query)}).json
    shuffled = "petal_width,sepal_length,petal_length,sepal_width\n0.2,5.1,1.4,3.5\n2.3,6.7,5.2,3.0\n"
    assert post_csv(client, shuffled, query).json == r.json


@pytest.mark.parametrize(
    ("text", "status", "words"),
    [
        ("sepal_length,sepal_width,petal_length,petal_width\n5.1,x,1.4,0.2\n", 400, "CSV line 2, column 'sepal_width'"),
        ("sepal_length,sepal_width,petal_length\n5.1,3.5,1.4\n", 400, "missing 'petal_width'"),
        ("5.1,3.5,1.4,0.2\n", 400, "first line must be a header row"),
        ("sepal_length,sepal_width,petal_length,petal_width\n", 400, "no data rows"),
        (CSV.replace("\n\n", "\n") + "7,3,5,2\n" * 3, 413, "at most 4 per request (MAX_ROWS)"),
    ],
    ids=["bad-cell", "missing-column", "no-header", "no-rows", "too-many-rows"],
)
def test_bad_csv_is_explained(make_app, text, status, words):
    """A CSV body that cannot be rows gets the one error shape naming the line, the column or the limit."""
    r = post_csv(make_app(MAX_ROWS=4).test_client(), text)
    assert r.status_code == status
    assert words in r.json["error"]["message"]


def test_csv_in_another_charset_and_other_media_are_415(client):
    """CSV must be UTF-8; a body neither JSON nor CSV is a 415 whose message names both."""
    assert post_csv(client, CSV, content_type="text/csv; charset=latin-1").status_code == 415
    r = post_csv(client, CSV, content_type="text/plain")
    assert r.status_code == 415
    assert "text/csv" in r.json["error"]["message"] and "application/json" in r.json["error"]["message"]
