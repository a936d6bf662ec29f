"""MLflow's scoring protocol: every input shape answers what native /predict answers, in MLflow's wire shapes.

The wire formats are pinned against MLflow's own documentation and client code (mlflow is not installed: it is a very
large dependency), each cited where it is used:
- https://mlflow.org/docs/latest/ml/deployment/deploy-model-locally ("Accepted Input Formats", the curl examples);
- mlflow/pyfunc/scoring_server/__init__.py (content types, the one-format-key rule, {"predictions": ...});
- mlflow/utils/proto_json_utils.py dump_input_data (what MLflow's client sends for a DataFrame, and params);
- mlflow/exceptions.py and mlflow/protos/databricks.proto (error codes and the statuses they map to).
"""

import csv
import gzip
import io
import json

import numpy as np
import pytest
import requests
from conftest import KEY, USER, basic_auth, served_model
from sklearn.linear_model import LinearRegression

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
# One row of each class and two in between: answers that differ by row, so a row put in the wrong place shows.
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5], [6.3, 2.5, 5.0, 1.9], [4.9, 3.1, 1.5, 0.1]]
SENTINEL = 98765.4321  # a value no error message may quote


def records(rows: list, names: list) -> list[dict]:
    """Rows as pandas' orient="records" writes them."""
    return [dict(zip(names, row)) for row in rows]


def columns(rows: list, names: list) -> dict:
    """Rows as an object of columns (TF serving's columnar "inputs")."""
    return {name: [row[j] for row in rows] for j, name in enumerate(names)}


def to_csv(rows: list, names: list, newline: str = "\n") -> str:
    """Rows as pandas' to_csv(index=False) writes them: a header row, then one line per row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=newline)
    writer.writerow(names)
    writer.writerows(rows)
    return out.getvalue()


def invoke(client, body, path: str = "/invocations", content_type: str = "application/json", headers=None):
    """POST an MLflow scoring request with the test user's credentials."""
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return client.post(path, data=data, content_type=content_type, headers={**basic_auth(), **(headers or {})})


def native(client, rows: list, path: str = "/predict", probabilities: bool = False) -> dict:
    """What Sibyl's own protocol answers for the same rows."""
    r = client.post(path, json={"features": rows, "probabilities": probabilities}, headers=basic_auth())
    assert r.status_code == 200, r.json
    return r.json


def mlflow_error(r, status: int, error_code: str) -> str:
    """Assert an answer is MLflow's error shape (exactly error_code and message: no stack_trace) and return the
    message."""
    assert (r.status_code, r.mimetype) == (status, "application/json"), r.data
    assert set(r.json) == {"error_code", "message"}, r.json
    assert r.json["error_code"] == error_code
    return r.json["message"]


@pytest.fixture
def several(make_app, make_model_dir):
    """iris 1 and 2 (4 named features) and tiny 9 (2 features fitted without names); DEFAULT_MODEL=iris."""
    root = make_model_dir({"iris": ["1", "2"], "tiny": ["9"]})
    return make_app(MODEL_PATH="", MODEL_DIR=str(root), DEFAULT_MODEL="iris").test_client()


REORDERED = FEATURES[::-1]
SHAPES = {
    # The documented examples' shapes (deploy-model-locally, "Accepted Input Formats"), with the iris features.
    "dataframe_split": {"dataframe_split": {"columns": FEATURES, "data": ROWS}},
    "dataframe_split columns in another order": {
        "dataframe_split": {"columns": REORDERED, "data": [row[::-1] for row in ROWS]}
    },
    # MLflow's client sends a DataFrame as {"dataframe_split": df.to_dict(orient="split")}: index included.
    "dataframe_split with index": {
        "dataframe_split": {"index": [10, 11, 12, 13, 14], "columns": FEATURES, "data": ROWS}
    },
    "dataframe_records": {"dataframe_records": records(ROWS, FEATURES)},
    "dataframe_records keys in another order": {"dataframe_records": records([r[::-1] for r in ROWS], REORDERED)},
    "instances rows": {"instances": ROWS},
    "instances records": {"instances": records(ROWS, FEATURES)},
    "instances columns": {"instances": columns(ROWS, FEATURES)},
    "inputs rows": {"inputs": ROWS},
    "inputs records": {"inputs": records(ROWS, FEATURES)},
    "inputs columns": {"inputs": columns(ROWS, FEATURES)},
    "inputs columns in another order": {"inputs": columns([r[::-1] for r in ROWS], REORDERED)},
    "params predict": {"inputs": ROWS, "params": {"predict_method": "predict"}},
    "params empty": {"inputs": ROWS, "params": {}},
}


@pytest.mark.parametrize("body", SHAPES.values(), ids=SHAPES.keys())
def test_every_json_shape_answers_what_native_predict_answers(client, body):
    """Each of MLflow's JSON formats, named columns in any order, gives native /predict's labels, row for row."""
    r = invoke(client, body)
    assert r.status_code == 200, r.json
    assert r.json == {"predictions": native(client, ROWS)["predictions"]}
    assert r.json["predictions"] == ["setosa", "virginica", "versicolor", "virginica", "setosa"]


@pytest.mark.parametrize(
    ("data", "headers"),
    [
        (to_csv(ROWS, FEATURES), {}),
        (to_csv([r[::-1] for r in ROWS], REORDERED), {}),  # the header's order, not the model's
        (to_csv(ROWS, FEATURES, newline="\r\n"), {}),  # what csv.writer and Excel write by default
        ("\ufeff" + to_csv(ROWS, FEATURES), {}),  # a byte-order mark, as Excel's "CSV UTF-8" writes
        ("\n" + to_csv(ROWS, FEATURES).replace("\n", "\n\n"), {}),  # blank lines, which pandas skips
        ('"sepal_length", sepal_width ,petal_length,petal_width\n' + to_csv(ROWS, FEATURES).split("\n", 1)[1], {}),
        (gzip.compress(to_csv(ROWS, FEATURES).encode()), {"Content-Encoding": "gzip"}),
    ],
    ids=["plain", "reordered", "crlf", "bom", "blank lines", "quoted and spaced header", "gzip"],
)
def test_csv_answers_what_native_predict_answers(client, data, headers):
    """text/csv with a header row (pandas' to_csv(index=False)) answers native /predict's labels."""
    r = invoke(client, data, content_type="text/csv", headers=headers)
    assert r.status_code == 200, r.json
    assert r.json == {"predictions": native(client, ROWS)["predictions"]}


@pytest.mark.parametrize("content_type", ["text/csv; charset=utf-8", "application/json; charset=UTF-8"])
def test_utf8_charset_is_accepted(client, content_type):
    """charset=utf-8 is the one charset MLflow's server accepts; it is accepted here too, in any case."""
    body = to_csv(ROWS, FEATURES) if content_type.startswith("text/csv") else json.dumps({"inputs": ROWS})
    r = invoke(client, body, content_type=content_type)
    assert r.status_code == 200 and len(r.json["predictions"]) == len(ROWS)


def test_documented_content_type_with_trailing_semicolon(client):
    """MLflow 2.11's docs send `Content-Type:application/json;` (deploy-model-locally, 2.11.1): it is accepted."""
    r = client.post(
        "/invocations", data=json.dumps({"inputs": ROWS}), headers={**basic_auth(), "Content-Type": "application/json;"}
    )
    assert r.status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": ROWS, "params": {"predict_method": "predict_proba"}},
        {"dataframe_split": {"columns": FEATURES, "data": ROWS}, "params": {"predict_method": "predict_proba"}},
    ],
    ids=["inputs", "dataframe_split"],
)
def test_predict_proba_is_each_rows_class_probabilities_in_class_order(client, app, body):
    """params {"predict_method": "predict_proba"} answers what the model's predict_proba returns, as MLflow returns
    that array: per row, the list of probabilities in the model's class order (native's, and the backend's, exactly)."""
    r = invoke(client, body)
    assert r.status_code == 200, r.json
    model = served_model(app)
    by_class = native(client, ROWS, probabilities=True)["probabilities"]
    assert list(by_class[0]) == model.class_keys == ["setosa", "versicolor", "virginica"]
    assert r.json["predictions"] == [[row[c] for c in model.class_keys] for row in by_class]
    _, p = model.backend.predict(np.asarray(ROWS, dtype=np.float64), True)
    assert r.json["predictions"] == p.tolist()
    assert np.argmax(r.json["predictions"], axis=1).tolist() == [0, 2, 1, 2, 0]


def test_predict_proba_from_csv_is_not_offered(client):
    """CSV carries no params (MLflow's server reads none from it): a CSV body always answers labels."""
    r = invoke(client, to_csv(ROWS, FEATURES), content_type="text/csv")
    assert r.json["predictions"][0] == "setosa"


def test_model_without_feature_names_takes_columns_by_position(several):
    """tiny was fitted without feature names: whatever the columns are called (pandas' 0, 1 for an unnamed
    DataFrame), they are taken in the order sent, in every format."""
    rows = [[1.5, -0.2], [-2.0, 0.3], [0.1, 0.1]]
    expected = native(several, rows, "/models/tiny/predict")["predictions"]
    bodies = [
        {"dataframe_split": {"index": [0, 1, 2], "columns": [0, 1], "data": rows}},  # DataFrame(X).to_dict("split")
        {"dataframe_split": {"columns": ["b", "a"], "data": rows}},
        {"dataframe_records": records(rows, ["b", "a"])},
        {"inputs": columns(rows, ["x", "y"])},
        {"instances": rows},
    ]
    for body in bodies:
        r = invoke(several, body, "/models/tiny/invocations")
        assert r.status_code == 200, (body, r.json)
        assert r.json["predictions"] == expected
    r = invoke(several, to_csv(rows, ["0", "1"]), "/models/tiny/invocations", content_type="text/csv")
    assert r.json["predictions"] == expected
    message = mlflow_error(
        invoke(several, {"inputs": columns([[*r, 0.0] for r in rows], ["a", "b", "c"])}, "/models/tiny/invocations"),
        400,
        "BAD_REQUEST",
    )
    assert "names 3 columns; the model expects 2" in message


def test_documented_inputs_example_predicts(several):
    """The docs' one curl body, {"inputs": [[1, 2], [3, 4], [5, 6]]} (deploy-model-locally), on a 2-feature model."""
    r = invoke(several, {"inputs": [[1, 2], [3, 4], [5, 6]]}, "/models/tiny/invocations")
    assert r.json == {"predictions": native(several, [[1, 2], [3, 4], [5, 6]], "/models/tiny/predict")["predictions"]}


def test_per_model_and_per_version_routes(several, capsys):
    """/models/<name>/invocations and /models/<name>/versions/<v>/invocations answer with that model, and the request
    log line names it."""
    rows = [[1.5, -0.2]]
    capsys.readouterr()
    assert invoke(several, {"inputs": ROWS}, "/models/iris/versions/2/invocations").status_code == 200
    assert invoke(several, {"inputs": rows}, "/models/tiny/invocations").status_code == 200
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if '"request"' in x]
    assert [(x["path"], x["model"], x["version"], x["rows"]) for x in lines] == [
        ("/models/iris/versions/2/invocations", "iris", "2", 5),
        ("/models/tiny/invocations", "tiny", "9", 1),
    ]


MISSING_EXTRA = {
    "dataframe_split": {"dataframe_split": {"columns": [*FEATURES[:3], "petal_area"], "data": ROWS}},
    "dataframe_records": {"dataframe_records": records(ROWS, [*FEATURES[:3], "petal_area"])},
    "inputs columns": {"inputs": columns(ROWS, [*FEATURES[:3], "petal_area"])},
    "instances records": {"instances": records(ROWS, [*FEATURES[:3], "petal_area"])},
}


@pytest.mark.parametrize("body", MISSING_EXTRA.values(), ids=MISSING_EXTRA.keys())
def test_missing_and_extra_columns_are_named(client, body):
    """A missing feature and an unknown column are both named in one 400, with the names the model expects."""
    message = mlflow_error(invoke(client, body), 400, "BAD_REQUEST")
    assert "missing 'petal_width'" in message and "unknown 'petal_area'" in message
    assert "the model expects sepal_length, sepal_width, petal_length, petal_width" in message


def test_csv_missing_and_extra_columns_are_named(client):
    """The CSV header is checked like dataframe_split's columns."""
    r = invoke(client, to_csv(ROWS, [*FEATURES[:3], "petal_area"]), content_type="text/csv")
    message = mlflow_error(r, 400, "BAD_REQUEST")
    assert message.startswith("the CSV header: missing 'petal_width'; unknown 'petal_area'")


def test_a_record_with_other_columns_than_the_first_is_named(client):
    """Every record must name the model's columns; the one that does not is named, with what it misses."""
    rows = records(ROWS, FEATURES)
    del rows[3]["petal_width"]
    message = mlflow_error(invoke(client, {"dataframe_records": rows}), 400, "BAD_REQUEST")
    assert message.startswith("dataframe_records[3]: missing 'petal_width'")


@pytest.mark.parametrize(
    ("csv_text", "fragment"),
    [
        (
            to_csv(ROWS, FEATURES) + f"5.0,3.0,{SENTINEL}x,0.2\n",
            "CSV line 7, column 'petal_length': not a finite number",
        ),
        (to_csv(ROWS, FEATURES) + "5.0,,1.0,0.2\n", "CSV line 7, column 'sepal_width': not a finite number"),
        (to_csv(ROWS, FEATURES) + "5.0,nan,1.0,0.2\n", "CSV line 7, column 'sepal_width'"),
        (to_csv(ROWS, FEATURES) + "5.0,1e999,1.0,0.2\n", "CSV line 7, column 'sepal_width'"),
        (to_csv(ROWS, FEATURES) + f"5.0,{SENTINEL},1.0\n", "CSV line 7 has 3 cells; the header names 4 columns"),
        ("\n".join(",".join(map(str, row)) for row in ROWS), "first line must be a header row naming the columns"),
        ("sepal_length,sepal_width,petal_length,petal_width\n", "has a header row but no data rows"),
        ("", "The CSV body is empty"),
        (b"sepal_length,sepal_width\xff\n", "not valid UTF-8"),
        ('sepal_length,"sepal_width\n' + "x" * 200_000, "could not be parsed at line"),
    ],
    ids=["letter", "empty cell", "nan", "overflow", "short row", "no header", "no rows", "empty", "latin-1", "quoting"],
)
def test_bad_csv_is_a_400_naming_line_and_column_not_the_value(client, csv_text, fragment):
    """A bad CSV is a 400 that says where (line, column), never what the cell held."""
    message = mlflow_error(invoke(client, csv_text, content_type="text/csv"), 400, "BAD_REQUEST")
    assert fragment in message
    assert str(SENTINEL) not in message and "5.1" not in message


BAD_JSON = {
    "two formats": ({"inputs": ROWS, "instances": ROWS}, "exactly one of dataframe_split"),
    "no format": ({"params": {}}, "exactly one of dataframe_split"),
    "MLflow 1.x split body": ({"columns": FEATURES, "data": ROWS}, "MLflow 2.0 changed the scoring protocol"),
    "a list": ([ROWS], "must be a JSON object"),
    "empty body": ("", "The request body is empty"),
    "not JSON": ("{inputs:", "not valid JSON"),
    "unknown field": ({"inputs": ROWS, "param": {}}, "Unknown field 'param'"),
    "split without columns": ({"dataframe_split": {"data": ROWS}}, "dataframe_split must be an object with columns"),
    "split unknown key": ({"dataframe_split": {"columns": FEATURES, "data": ROWS, "dtypes": {}}}, "unknown field"),
    "split duplicate column": (
        {"dataframe_split": {"columns": [*FEATURES[:3], "sepal_length"], "data": ROWS}},
        "more than once",
    ),
    "split short row": (
        {"dataframe_split": {"columns": REORDERED, "data": [[SENTINEL, 1.0]]}},
        "dataframe_split.data[0] must be a list of 4",
    ),
    "split string value": (
        {"dataframe_split": {"columns": FEATURES, "data": [[1, 2, "x", 4]]}},
        "dataframe_split.data[0][2] is a string",
    ),
    "records not objects": ({"dataframe_records": ROWS}, "list of objects"),
    "records later row not object": (
        {"dataframe_records": [records(ROWS, FEATURES)[0], ROWS[0]]},
        "dataframe_records[1] is not an object",
    ),
    "inputs empty": ({"inputs": []}, "inputs must be a non-empty list"),
    "inputs null value": ({"inputs": [[1, 2, None, 4]]}, "inputs[0][2] is null"),
    "params not an object": ({"inputs": ROWS, "params": ["predict_proba"]}, "params must be an object"),
    "unknown predict_method": (
        {"inputs": ROWS, "params": {"predict_method": "predict_log_proba"}},
        "must be 'predict' or 'predict_proba'",
    ),
    "predict_method not a string": (
        {"inputs": ROWS, "params": {"predict_method": ["predict"]}},
        "must be 'predict' or 'predict_proba'",
    ),
    "unknown param": (
        {"inputs": ROWS, "params": {"predict_method": "predict", "temperature": SENTINEL}},
        "Unknown param 'temperature'",
    ),
}


@pytest.mark.parametrize(("body", "fragment"), BAD_JSON.values(), ids=BAD_JSON.keys())
def test_bad_json_is_a_400_in_mlflows_shape(client, body, fragment):
    """Each malformed body is a 400 BAD_REQUEST in MLflow's shape that says how to fix it, quoting no value."""
    message = mlflow_error(invoke(client, body), 400, "BAD_REQUEST")
    assert fragment in message
    assert str(SENTINEL) not in message and "predict_log_proba" not in message


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"inputs": {**columns(ROWS, FEATURES), "petal_width": [SENTINEL]}}, "different lengths"),
        ({"dataframe_split": {"columns": FEATURES, "data": ROWS, "index": [0]}}, "one label per row"),
    ],
    ids=["columns of different lengths", "index shorter than data"],
)
def test_lengths_a_schema_cannot_state_are_a_422(client, body, says):
    """What the schema allows piece by piece (lists of numbers, a list of labels) but cannot form rows: 422."""
    assert says in mlflow_error(invoke(client, body), 422, "BAD_REQUEST")


def test_predict_proba_on_a_regressor_is_a_400(make_app, make_model):
    """A regressor has no predict_proba: asking for it is a 400 saying so; predict answers the model's values."""
    client = make_app(
        MODEL_PATH=str(make_model(LinearRegression(), n_features=3, name="reg", classify=False))
    ).test_client()
    r = invoke(client, {"inputs": [[1.0, 1.0, 1.0]], "params": {"predict_method": "predict_proba"}})
    assert "regression model and has no predict_proba" in mlflow_error(r, 400, "BAD_REQUEST")
    r = invoke(client, {"inputs": [[1.0, 1.0, 1.0]]})
    assert (
        r.json
        == {"predictions": native(client, [[1.0, 1.0, 1.0]])["predictions"]}
        == {"predictions": [pytest.approx(6.5)]}
    )


@pytest.mark.parametrize(
    ("content_type", "headers", "fragment"),
    [
        ("text/plain", {}, "Send JSON (Content-Type: application/json)"),
        ("application/x-www-form-urlencoded", {}, "or CSV with a header row (Content-Type: text/csv)"),
        # MLflow 1.x's content types: MLflow 2.x's server answers them 415 too (unrecognized parameters).
        ("application/json; format=pandas-split", {}, "Unknown Content-Type parameter 'format': MLflow 2.0 dropped"),
        ("application/json; format=pandas-records", {}, "MLflow 2.0 dropped format="),
        ("text/csv; charset=latin-1", {}, "Only UTF-8 is accepted"),
        ("application/json", {"Content-Encoding": "br"}, "The Content-Encodings accepted are gzip and deflate"),
    ],
)
def test_wrong_media_type_is_a_415(client, content_type, headers, fragment):
    """Anything but UTF-8 JSON or CSV (gzip or not) is a 415 in MLflow's shape."""
    r = invoke(client, {"inputs": ROWS}, content_type=content_type, headers=headers)
    assert fragment in mlflow_error(r, 415, "BAD_REQUEST")


def test_no_content_type_is_a_415(client):
    """A body with no Content-Type at all is a 415 too."""
    r = client.post("/invocations", data=json.dumps({"inputs": ROWS}), headers=basic_auth())
    mlflow_error(r, 415, "BAD_REQUEST")


@pytest.mark.parametrize("headers", [{}, basic_auth(USER, "wrong-key"), {"Authorization": "Bearer nope"}])
def test_unauthenticated_is_a_401_in_mlflows_shape(client, headers):
    """No or wrong credentials: 401 UNAUTHENTICATED (MLflow's code for 401), with the scheme's challenge."""
    r = client.post("/invocations", json={"inputs": ROWS}, headers=headers)
    assert "Send valid credentials" in mlflow_error(r, 401, "UNAUTHENTICATED")
    assert r.headers["WWW-Authenticate"].split()[0] in {"Basic", "Bearer"}


def test_bearer_key_is_accepted(client):
    """The API key as a bearer token works as basic auth does."""
    r = client.post("/invocations", json={"inputs": ROWS}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200


def test_unknown_model_or_version_is_resource_does_not_exist(several):
    """404s for a model or version the registry lacks are RESOURCE_DOES_NOT_EXIST, listing what is served."""
    message = mlflow_error(
        invoke(several, {"inputs": ROWS}, "/models/nope/invocations"), 404, "RESOURCE_DOES_NOT_EXIST"
    )
    assert message == "No model of that name; this server serves: iris, tiny."
    message = mlflow_error(
        invoke(several, {"inputs": ROWS}, "/models/iris/versions/7/invocations"), 404, "RESOURCE_DOES_NOT_EXIST"
    )
    assert "has no such version; versions: 1, 2" in message


def test_no_default_model_is_a_404_saying_which_route(make_app, make_model_dir):
    """With several models and no DEFAULT_MODEL, /invocations says to name the model."""
    client = make_app(MODEL_PATH="", MODEL_DIR=str(make_model_dir({"iris": ["1"], "tiny": ["1"]}))).test_client()
    message = mlflow_error(invoke(client, {"inputs": ROWS}), 404, "RESOURCE_DOES_NOT_EXIST")
    assert "POST to /models/<name>/invocations" in message


def test_unavailable_version_is_temporarily_unavailable(make_app, make_model_dir):
    """A version that could not load (SKIP_BAD_MODELS) is a 503 TEMPORARILY_UNAVAILABLE."""
    root = make_model_dir({"iris": ["1"], "tiny": ["1", "2"]})
    artifact = root / "tiny" / "2" / "model.joblib"
    artifact.write_bytes(artifact.read_bytes() + b"\0")  # its checksum no longer matches
    client = make_app(MODEL_PATH="", MODEL_DIR=str(root), DEFAULT_MODEL="iris", SKIP_BAD_MODELS=True).test_client()
    r = invoke(client, {"inputs": [[0.0, 1.0]]}, "/models/tiny/versions/2/invocations")
    assert "could not be loaded" in mlflow_error(r, 503, "TEMPORARILY_UNAVAILABLE")


def test_too_many_rows_and_too_large_bodies_are_413s(make_app):
    """MAX_ROWS and MAX_BODY_BYTES are enforced as for every protocol, in MLflow's shape."""
    client = make_app(MAX_ROWS=2).test_client()
    assert "5 rows sent; at most 2" in mlflow_error(invoke(client, {"inputs": ROWS}), 413, "BAD_REQUEST")
    r = invoke(client, to_csv(ROWS, FEATURES), content_type="text/csv")
    assert "5 rows sent; at most 2" in mlflow_error(r, 413, "BAD_REQUEST")
    client = make_app(MAX_CONTENT_LENGTH=200).test_client()
    r = invoke(client, to_csv(ROWS * 5, FEATURES), content_type="text/csv")
    assert "MAX_BODY_BYTES" in mlflow_error(r, 413, "BAD_REQUEST")


def test_wrong_method_is_a_405_in_mlflows_shape(client):
    """Routing fails before Flask knows the blueprint; the 405 still reaches an MLflow client in MLflow's shape."""
    r = client.get("/invocations", headers=basic_auth())
    mlflow_error(r, 405, "BAD_REQUEST")
    assert "POST" in r.headers["Allow"]
    other = client.delete("/models", headers=basic_auth())  # a native route's wrong method keeps Sibyl's shape
    assert other.status_code == 405 and other.json["error"]["code"] == "method_not_allowed"


def test_ping_is_public_and_health_keeps_its_answer(client):
    """/ping answers 200 without credentials (MLflow's clients read only the status); /health is still Sibyl's."""
    r = client.get("/ping")
    assert (r.status_code, r.json) == (200, {"status": "ok"})
    assert client.get("/health").json == {"status": "ok"}


def test_version_needs_credentials_and_names_no_library(client):
    """/version reveals nothing without a key; with one it is Sibyl's API version (OpenAPI's info.version), a bare
    string as MLflow's /version is, and no library's version."""
    mlflow_error(client.get("/version"), 401, "UNAUTHENTICATED")
    r = client.get("/version", headers=basic_auth())
    assert (r.status_code, r.mimetype, r.text) == (
        200,
        "text/plain",
        client.get("/openapi.json").json["info"]["version"],
    )


def test_an_mlflow_routes_crash_is_an_internal_error_without_a_trace(app, client, monkeypatch):
    """A bug is a 500 INTERNAL_ERROR with a generic message: no stack_trace field, no trace in the message; the
    request id to quote is in X-Request-ID."""
    model = served_model(app)

    def broken(X, proba):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(model.backend, "predict", broken)
    r = invoke(client, {"inputs": ROWS})
    message = mlflow_error(r, 500, "INTERNAL_ERROR")
    assert "secret" not in message and "Traceback" not in message
    assert len(r.headers["X-Request-ID"]) == 32  # the id the message asks to quote, tied to the logged trace


def test_cache_headers_and_cache_control(make_app, redis_url):
    """X-Cache reports the cache per request, and Cache-Control is honoured, as for native /predict."""
    client = make_app(REDIS_URL=redis_url).test_client()
    body = {"dataframe_split": {"columns": FEATURES, "data": ROWS}}
    assert invoke(client, body).headers["X-Cache"] == "MISS"
    r = invoke(client, body)
    assert (r.headers["X-Cache"], r.headers["X-Cache-Hits"]) == ("HIT", "5")
    assert invoke(client, body, headers={"Cache-Control": "no-cache"}).headers["X-Cache"] == "BYPASS"
    # Probabilities are cached apart from labels: the first predict_proba is a miss, not a label from the cache.
    proba = {**body, "params": {"predict_method": "predict_proba"}}
    r = invoke(client, proba)
    assert r.headers["X-Cache"] == "MISS" and type(r.json["predictions"][0]) is list
    assert invoke(client, proba).json == r.json


def test_second_identical_invocation_is_a_hit_over_gunicorn_and_redis(live_server, redis_url):
    """Under real gunicorn with a real Redis, a second identical /invocations is a cache HIT with the same answer,
    and each request's log line names the model and the route."""
    server = live_server(env={"REDIS_URL": redis_url, "CACHE_LOCAL_ENTRIES": "0"})  # every HIT is from Redis
    body = {"dataframe_split": {"index": list(range(len(ROWS))), "columns": FEATURES, "data": ROWS}}
    answers = [
        requests.post(
            server.url + "/invocations", json=body, headers={**basic_auth(), "X-Request-ID": f"mlflow-{n}"}, timeout=10
        )
        for n in range(2)
    ]
    assert [(r.status_code, r.headers["X-Cache"]) for r in answers] == [(200, "MISS"), (200, "HIT")]
    assert (
        answers[0].json()
        == answers[1].json()
        == {"predictions": ["setosa", "virginica", "versicolor", "virginica", "setosa"]}
    )
    lines = {x["request_id"]: x for x in server.request_lines()}
    for n, cache in enumerate(("MISS", "HIT")):
        line = lines[f"mlflow-{n}"]
        assert (line["path"], line["model"], line["version"], line["rows"], line["cache"]) == (
            "/invocations",
            "iris",
            "1",
            5,
            cache,
        )
    r = requests.post(server.url + "/invocations", data="x", headers={"Content-Type": "text/csv"}, timeout=10)
    assert (r.status_code, r.json()) == (401, {"error_code": "UNAUTHENTICATED", "message": r.json()["message"]})
    csv_answer = requests.post(
        server.url + "/invocations",
        data=to_csv(ROWS, FEATURES),
        headers={**basic_auth(), "Content-Type": "text/csv"},
        timeout=10,
    )
    assert csv_answer.json() == answers[0].json() and csv_answer.headers["X-Cache"] == "HIT"
