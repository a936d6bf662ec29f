"""KServe's V1 protocol: /v1/models, readiness, :predict (encoded colon too), in KServe's shapes, errors included."""

import gzip
import http.client
import json

import joblib
import numpy as np
import pytest
import requests
from conftest import IRIS_ROWS, KEY, basic_auth

NAMED = [
    {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2},
    {"petal_width": 2.3, "petal_length": 5.2, "sepal_width": 3.0, "sepal_length": 6.7},  # any key order
]
# TensorFlow Serving's columnar "inputs", its keys out of the model's order.
COLUMNS = {"petal_width": [0.2, 2.3], "sepal_length": [5.1, 6.7], "petal_length": [1.4, 5.2], "sepal_width": [3.5, 3.0]}
PREDICT = "/v1/models/iris:predict"


def post(client, body, path=PREDICT, **kw):
    """POST JSON with the test user's credentials."""
    return client.post(path, json=body, headers=basic_auth(), **kw)


def assert_kserve_error(r, status: int) -> str:
    """The reply is KServe's error body, {"error": "<message>"} and nothing else, with that status; its message."""
    assert (r.status_code, r.mimetype) == (status, "application/json"), r.get_data(as_text=True)
    assert list(r.json) == ["error"] and type(r.json["error"]) is str and r.json["error"]
    return r.json["error"]


@pytest.fixture
def two_models(make_app, make_model_dir):
    """iris 1 (4 named features, string labels) and tiny 1 (2 unnamed features, integer labels)."""
    root = make_model_dir({"iris": ["1"], "tiny": ["1"]})
    return make_app(MODEL_PATH="", MODEL_DIR=str(root), DEFAULT_MODEL="iris", INFERENCE_BACKEND="sklearn")


def test_models_lists_the_names_served(two_models):
    """GET /v1/models is KServe's {"models": [name, ...]}."""
    r = two_models.test_client().get("/v1/models", headers=basic_auth())
    assert (r.status_code, r.json) == (200, {"models": ["iris", "tiny"]})


def test_model_ready_names_the_model(client):
    """GET /v1/models/<name> is {"name", "ready": true} for a model that answers."""
    r = client.get("/v1/models/iris", headers=basic_auth())
    assert (r.status_code, r.json) == (200, {"name": "iris", "ready": True})


@pytest.mark.parametrize(
    "body",
    [
        {"instances": IRIS_ROWS},
        {"instances": NAMED},
        {"instances": [IRIS_ROWS[0], NAMED[1]]},
        {"inputs": IRIS_ROWS},
        {"inputs": NAMED},
        {"inputs": COLUMNS},
    ],
    ids=["instances-lists", "instances-records", "instances-mixed", "inputs-lists", "inputs-records", "inputs-columns"],
)
def test_predictions_are_the_models_own_and_native_agrees(client, iris_path, body):
    """Lists, records in any key order (the shape KServe's sklearn server answers 500 to), mixes and columns all give
    the estimator's own labels, in row order, exactly as native /predict does."""
    expected = joblib.load(iris_path).predict(np.array(IRIS_ROWS)).tolist()
    r = post(client, body)
    assert (r.status_code, r.json) == (200, {"predictions": expected})
    assert post(client, {"features": IRIS_ROWS}, path="/predict").json["predictions"] == expected
    assert expected == ["setosa", "virginica"]


def test_integer_labels_stay_integers(two_models):
    """A model with integer classes answers JSON integers, as native does."""
    client = two_models.test_client()
    rows = [[1.0, 2.0], [-3.0, -4.0]]
    r = post(client, {"instances": rows}, path="/v1/models/tiny:predict")
    assert r.json == {"predictions": [1, 0]}
    assert r.json["predictions"] == post(client, {"features": rows}, path="/models/tiny/predict").json["predictions"]


@pytest.mark.parametrize("colon", ["%3A", "%3a"])
def test_encoded_colon_is_the_verb(client, colon):
    """A client that percent-encodes the colon reaches :predict, not a model named "iris:predict"."""
    r = post(client, {"instances": IRIS_ROWS}, path=f"/v1/models/iris{colon}predict")
    assert (r.status_code, r.json) == (200, {"predictions": ["setosa", "virginica"]})


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded"])
def test_any_content_type_is_read_as_json(client, content_type):
    """KServe reads the body as JSON whatever its label: its Python client (InferenceRESTClient) sends none, its
    docs' `curl -d @input.json` a form type."""
    data = json.dumps({"instances": IRIS_ROWS}).encode()
    r = client.post(PREDICT, data=data, content_type=content_type, headers=basic_auth())
    assert content_type is not None or "Content-Type" not in r.request.headers
    assert (r.status_code, r.json) == (200, {"predictions": ["setosa", "virginica"]})


def test_gzip_body_is_accepted(client):
    """Content-Encoding: gzip is inflated as for every protocol."""
    data = gzip.compress(json.dumps({"instances": IRIS_ROWS}).encode())
    headers = {**basic_auth(), "Content-Encoding": "gzip"}
    r = client.post(PREDICT, data=data, content_type="application/json", headers=headers)
    assert r.json == {"predictions": ["setosa", "virginica"]}


def test_predict_serves_the_default_version(make_app, make_model_dir, capsys):
    """KServe names a model without a version: :predict answers with the default version the manifest names."""
    root = make_model_dir({"iris": ["1", "2"]}, manifests={"iris": {"default": "1"}})
    client = make_app(MODEL_PATH="", MODEL_DIR=str(root), INFERENCE_BACKEND="sklearn").test_client()
    capsys.readouterr()
    assert post(client, {"instances": IRIS_ROWS}).status_code == 200
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if '"path":"/v1/' in x]
    assert (line["model"], line["version"], line["rows"]) == ("iris", "1", 2)


# (body as sent, status, a phrase the message must hold)
BAD_BODIES = [
    (b"", 400, "empty"),
    (b"not json", 400, "not valid JSON"),
    (b"[[5.1, 3.5, 1.4, 0.2]]", 400, "JSON object"),
    (b"{}", 400, 'exactly one of "instances" or "inputs"'),
    (json.dumps({"instances": IRIS_ROWS, "inputs": IRIS_ROWS}).encode(), 400, "exactly one of"),
    (json.dumps({"instances": IRIS_ROWS, "signature": "s3cr3t"}).encode(), 400, "unknown field 'signature'"),
    (json.dumps({"instances": "s3cr3t"}).encode(), 400, "non-empty list of rows"),
    (json.dumps({"instances": []}).encode(), 400, "non-empty list of rows"),
    (json.dumps({"instances": [[1, 2]]}).encode(), 400, "has 2 values; the model expects 4"),
    (json.dumps({"instances": [[5.1, 3.5, 1.4, "s3cr3t"]]}).encode(), 400, "instances[0][3] is a string"),
    (json.dumps({"inputs": [{**NAMED[0], "petal_colour": "s3cr3t"}]}).encode(), 400, "unknown field 'petal_colour'"),
    (json.dumps({"inputs": [{"sepal_length": 5.1}]}).encode(), 400, "is missing 'sepal_width'"),
    (json.dumps({"inputs": {**COLUMNS, "sepal_width": [3.5]}}).encode(), 422, "different lengths"),
    (b'{"instances": [[1e400, 1, 1, 1]]}', 400, "not valid JSON"),
]


@pytest.mark.parametrize(("data", "status", "phrase"), BAD_BODIES)
def test_bad_bodies_are_400_in_kserve_shape(client, data, status, phrase):
    """Every malformed or misfitting body is a 400 saying how to fix it, never a 500, never quoting the values."""
    r = client.post(PREDICT, data=data, content_type="application/json", headers=basic_auth())
    message = assert_kserve_error(r, status)
    assert phrase in message and "s3cr3t" not in message


@pytest.mark.parametrize("path", ["/v1/models/n0-such-model:predict", "/v1/models/n0-such-model"])
def test_unknown_model_is_404_without_echoing_the_name(client, path):
    """An unknown name is a 404 listing what is served (never the name sent), on predict and readiness alike."""
    method = "POST" if path.endswith(":predict") else "GET"
    r = client.open(path, method=method, json={"instances": IRIS_ROWS}, headers=basic_auth())
    message = assert_kserve_error(r, 404)
    assert "iris" in message and "n0-such-model" not in message


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/v1/models/iris:predict", 405, "POST"),
        ("GET", "/v1/models/iris%3Apredict", 405, "POST"),
        ("POST", "/v1/models/iris", 405, "GET"),
        ("PUT", "/v1/models", 405, "GET"),
        ("GET", "/v1/nothing", 404, None),
        ("POST", "/v1/models/iris:predict/", 404, None),
    ],
)
def test_routing_failures_under_v1_are_kserve_errors(client, method, path, status, allow):
    """A wrong method or unknown path under /v1 answers in KServe's shape too; GET of :predict is a wrong method
    (Allow: POST), not a lookup of a model named "iris:predict"."""
    r = client.open(path, method=method, headers=basic_auth())
    assert_kserve_error(r, status)
    if allow:
        assert allow in r.headers["Allow"]


@pytest.mark.parametrize("headers", [{}, basic_auth(key="wrong-key"), {"Authorization": "Bearer wrong-key"}])
@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/models"), ("GET", "/v1/models/iris"), ("POST", PREDICT)])
def test_401_is_in_kserve_shape(client, headers, method, path):
    """Every V1 route needs credentials; the 401 is KServe's shape, with the challenge for the scheme."""
    r = client.open(path, method=method, json={"instances": IRIS_ROWS}, headers=headers)
    assert "credentials" in assert_kserve_error(r, 401)
    assert r.headers["WWW-Authenticate"]


def test_bearer_key_is_accepted(client):
    """The API key alone as a bearer token works as with every protocol."""
    r = client.post(PREDICT, json={"instances": IRIS_ROWS}, headers={"Authorization": f"Bearer {KEY}"})
    assert (r.status_code, r.json) == (200, {"predictions": ["setosa", "virginica"]})


def test_413_for_too_many_rows_and_too_big_a_body(make_app):
    """MAX_ROWS and MAX_BODY_BYTES hold on :predict, each a 413 in KServe's shape."""
    client = make_app(MAX_ROWS=1).test_client()
    assert "MAX_ROWS" in assert_kserve_error(post(client, {"instances": IRIS_ROWS}), 413)
    client = make_app(MAX_CONTENT_LENGTH=100).test_client()
    assert "MAX_BODY_BYTES" in assert_kserve_error(post(client, {"instances": IRIS_ROWS * 10}), 413)


def test_415_for_an_unknown_content_encoding(client):
    """Only gzip is inflated; another Content-Encoding is a 415 in KServe's shape."""
    headers = {**basic_auth(), "Content-Encoding": "br"}
    r = client.post(
        PREDICT, data=json.dumps({"instances": IRIS_ROWS}), content_type="application/json", headers=headers
    )
    assert "gzip" in assert_kserve_error(r, 415)


def tamper(root, name: str, version: str) -> None:
    """Change an artifact's bytes after its metadata recorded them, so it fails its checksum at load."""
    artifact = root / name / version / "model.joblib"
    artifact.write_bytes(artifact.read_bytes() + b"\0")


def test_unloadable_model_is_503_not_ready(make_app, make_model_dir):
    """A model whose version could not be loaded (SKIP_BAD_MODELS) is not ready: 503 on readiness and predict."""
    root = make_model_dir({"iris": ["1"], "tiny": ["1"]})
    tamper(root, "tiny", "1")
    client = make_app(MODEL_PATH="", MODEL_DIR=str(root), DEFAULT_MODEL="iris", SKIP_BAD_MODELS=True).test_client()
    assert "not ready" in assert_kserve_error(client.get("/v1/models/tiny", headers=basic_auth()), 503)
    assert_kserve_error(post(client, {"instances": [[1.0, 2.0]]}, path="/v1/models/tiny:predict"), 503)
    assert client.get("/v1/models/iris", headers=basic_auth()).json == {"name": "iris", "ready": True}
    assert client.get("/v1/models", headers=basic_auth()).json == {"models": ["iris", "tiny"]}


def test_traffic_split_is_ready_only_if_every_drawn_version_loads(make_app, make_model_dir):
    """Under a traffic split any weighted version may answer, so one that could not load makes the model not ready;
    a version weighted 0 is never drawn and does not count."""
    for weights, ready in (({"1": 1, "2": 1}, False), ({"1": 1, "2": 0}, True)):
        root = make_model_dir({"iris": ["1"], "tiny": ["1", "2"]}, manifests={"tiny": {"traffic": weights}})
        tamper(root, "tiny", "2")
        app = make_app(MODEL_PATH="", MODEL_DIR=str(root), DEFAULT_MODEL="iris", SKIP_BAD_MODELS=True)
        r = app.test_client().get("/v1/models/tiny", headers=basic_auth())
        assert r.status_code == (200 if ready else 503), weights


def test_cache_control_no_store_is_honoured(make_app, redis_url):
    """Cache-Control on :predict goes through the one pipeline: no-store keeps nothing, so the next is a MISS."""
    client = make_app(REDIS_URL=redis_url).test_client()
    body = {"instances": [[6.1, 2.8, 4.7, 1.2]]}
    r = client.post(PREDICT, json=body, headers={**basic_auth(), "Cache-Control": "no-store"})
    assert r.headers["X-Cache"] == "MISS"
    assert post(client, body).headers["X-Cache"] == "MISS"
    assert post(client, body).headers["X-Cache"] == "HIT"


# --- over real gunicorn and redis-server ---


def raw_request(port: int, method: str, target: str, body: bytes = b"") -> tuple[int, dict, dict]:
    """Send the request line exactly as written (http.client does not re-encode %3A): status, headers, JSON."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in {
            **basic_auth(),
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
        }.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), json.loads(resp.read())
    finally:
        conn.close()


def test_live_encoded_colon_and_repeats_are_cache_hits(live_server, redis_url):
    """Through gunicorn with real Redis: a raw %3A in the request line reaches :predict, the repeat of a request is a
    cache HIT with the same answer, and a GET of the verb is KServe's 405."""
    server = live_server(env={"REDIS_URL": redis_url, "CACHE_TIMEOUT_MS": "1000"}, workers=2)
    body = json.dumps({"instances": NAMED}).encode()
    first = raw_request(server.port, "POST", "/v1/models/iris%3Apredict", body)
    again = raw_request(server.port, "POST", "/v1/models/iris%3apredict", body)
    assert (first[0], first[1]["X-Cache"], first[2]) == (200, "MISS", {"predictions": ["setosa", "virginica"]})
    assert (again[0], again[1]["X-Cache"], again[1]["X-Cache-Hits"], again[2]) == (200, "HIT", "2", first[2])
    native = requests.post(server.url + "/predict", json={"features": IRIS_ROWS}, headers=basic_auth(), timeout=10)
    assert native.json()["predictions"] == first[2]["predictions"]
    assert native.headers["X-Cache"] == "HIT"  # the same rows, the same model: one cache for every protocol
    status, headers, reply = raw_request(server.port, "GET", "/v1/models/iris%3Apredict")
    assert (status, list(reply)) == (405, ["error"])
    assert {m.strip() for m in headers["Allow"].split(",")} == {"POST", "OPTIONS"}
    lines = [x for x in server.request_lines() if x["path"].startswith("/v1/")]
    assert [(x["path"], x["status"], x.get("cache")) for x in lines] == [
        ("/v1/models/iris:predict", 200, "MISS"),
        ("/v1/models/iris:predict", 200, "HIT"),
        ("/v1/models/iris:predict", 405, None),
    ]
