"""The Open Inference Protocol (KServe V2): health, metadata and infer, JSON and binary, as tritonclient speaks it."""

import gzip
import json
import struct
import zlib

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from conftest import IRIS_ROWS, KEY, USER, basic_auth, served_model
from sklearn.linear_model import LogisticRegression, Ridge
from tritonclient.http.auth import BasicAuth
from tritonclient.utils import InferenceServerException

INFER = "/v2/models/iris/infer"
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]  # the demo model's, as it was fitted
# Whole numbers, so every integer datatype carries them exactly.
WHOLE_ROWS = [[5, 3, 1, 0], [7, 3, 5, 2], [6, 2, 4, 1]]
HEADER = "Inference-Header-Content-Length"


def matrix(rows: list, datatype: str = "FP64", name: str = "input") -> dict:
    """One input tensor holding every feature, rows nested."""
    return {"name": name, "shape": [len(rows), len(rows[0])], "datatype": datatype, "data": rows}


def infer(client, body: dict, path: str = INFER, **kw):
    """POST a JSON infer request with the test user's credentials."""
    return client.post(path, json=body, headers={**basic_auth(), **kw.pop("headers", {})}, **kw)


def native(client, rows: list, proba: bool = False, path: str = "/predict") -> dict:
    """Sibyl's own answer for rows, to compare the V2 answer with."""
    r = client.post(path, json={"features": rows, "probabilities": proba}, headers=basic_auth())
    assert r.status_code == 200, r.json
    return r.json


def binary_body(request: dict, *chunks: bytes) -> tuple[bytes, dict]:
    """A binary-extension request: the JSON header, then the tensors' bytes; the header giving the JSON's length."""
    header = json.dumps(request).encode()
    return header + b"".join(chunks), {**basic_auth(), HEADER: str(len(header))}


def outputs(r) -> dict:
    """A reply's outputs by name as numpy arrays, read by tritonclient's own parser (JSON or binary)."""
    result = triton.InferenceServerClient.parse_response_body(r.data, header_length=r.headers.get(HEADER))
    return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}


def error_of(r) -> str:
    """The message of a V2 error, checking the body is exactly {"error": "<message>"}."""
    assert r.mimetype == "application/json"
    assert list(r.json) == ["error"] and type(r.json["error"]) is str
    return r.json["error"]


# --- health and metadata ---


def test_server_metadata_names_sibyl_and_its_extension_only(client):
    """GET /v2 is Sibyl's name, its API version and the binary extension: no library or artifact versions."""
    r = client.get("/v2", headers=basic_auth())
    assert r.status_code == 200
    assert r.json == {"name": "sibyl", "version": "1", "extensions": ["binary_tensor_data"]}


def test_health_probes_are_public_and_the_rest_needs_credentials(client):
    """/v2/health/* answer without credentials; everything else is a 401 in V2's error shape."""
    assert client.get("/v2/health/live").json == {"live": True}
    assert client.get("/v2/health/ready").json == {"ready": True}
    for path in ("/v2", "/v2/models/iris", "/v2/models/iris/ready", "/v2/models/iris/versions/1"):
        r = client.get(path)
        assert r.status_code == 401, path
        assert "credentials" in error_of(r)
        assert r.headers["WWW-Authenticate"].startswith("Basic")
    r = client.post(INFER, json={"inputs": [matrix(IRIS_ROWS)]})
    assert r.status_code == 401 and "credentials" in error_of(r)
    wrong = {"Authorization": "Bearer not-a-key"}
    assert client.get("/v2", headers=wrong).status_code == 401


def test_model_metadata_describes_inputs_and_outputs(client):
    """Names, datatypes and shapes, -1 the batch dimension; predict is the default output."""
    r = client.get("/v2/models/iris", headers=basic_auth())
    assert r.status_code == 200
    assert r.json == {
        "name": "iris",
        "versions": ["1"],
        "platform": "scikit-learn",
        "inputs": [{"name": "input", "datatype": "FP64", "shape": [-1, 4]}],
        "outputs": [
            {"name": "predict", "datatype": "BYTES", "shape": [-1], "parameters": {"default": True}},
            {"name": "predict_proba", "datatype": "FP64", "shape": [-1, 3], "parameters": {"default": False}},
        ],
    }
    assert client.get("/v2/models/iris/versions/1", headers=basic_auth()).json == r.json


def test_label_datatypes_follow_the_model(make_app, make_model):
    """Integer labels are INT64, a regressor's values FP64 with no predict_proba; both answer in that datatype."""
    ints = make_app(MODEL_PATH=str(make_model(LogisticRegression(), name="ints"))).test_client()
    meta = ints.get("/v2/models/ints", headers=basic_auth()).json
    assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [("predict", "INT64"), ("predict_proba", "FP64")]
    rows = [[1.0, 2.0], [-3.0, -1.0]]
    r = infer(ints, {"inputs": [matrix(rows)]}, "/v2/models/ints/infer")
    assert r.json["outputs"] == [
        {"name": "predict", "datatype": "INT64", "shape": [2], "data": native(ints, rows)["predictions"]}
    ]

    reg = make_app(MODEL_PATH=str(make_model(Ridge(), name="reg", classify=False))).test_client()
    meta = reg.get("/v2/models/reg", headers=basic_auth()).json
    assert meta["outputs"] == [{"name": "predict", "datatype": "FP64", "shape": [-1], "parameters": {"default": True}}]
    r = infer(reg, {"inputs": [matrix(rows)]}, "/v2/models/reg/infer")
    assert r.json["outputs"][0]["datatype"] == "FP64"
    assert r.json["outputs"][0]["data"] == native(reg, rows)["predictions"]
    r = infer(reg, {"inputs": [matrix(rows)], "outputs": [{"name": "predict_proba"}]}, "/v2/models/reg/infer")
    assert r.status_code == 400 and "no predict_proba" in error_of(r)


def test_model_ready_is_a_fact_about_this_worker(app):
    """A model whose backend fails its sample row is not ready (503, V2's shape); unknown names are 404s."""
    client = app.test_client()
    assert client.get("/v2/models/iris/ready", headers=basic_auth()).json == {"name": "iris", "ready": True}
    assert client.get("/v2/models/iris/versions/1/ready", headers=basic_auth()).status_code == 200
    for path in ("/v2/models/nope/ready", "/v2/models/iris/versions/9/ready", "/v2/models/nope"):
        r = client.get(path, headers=basic_auth())
        assert r.status_code == 404 and error_of(r)

    class Broken:
        name = scope = "broken"

        def predict(self, X, proba):
            raise RuntimeError("onnxruntime session is gone")

    served_model(app).backend = Broken()
    for path in ("/v2/models/iris/ready", "/v2/health/ready"):
        r = client.get(path, headers=basic_auth())
        assert r.status_code == 503 and "onnxruntime" not in error_of(r)


def test_openapi_describes_v2_in_its_error_shape(client):
    """/openapi.json documents the V2 routes: probes public, the rest secured, errors as V2Error, the binary form."""
    spec = client.get("/openapi.json").json
    assert spec["components"]["schemas"]["V2Error"]["required"] == ["error"]
    assert "security" not in spec["paths"]["/v2/health/live"]["get"]
    assert "security" not in spec["paths"]["/v2/health/ready"]["get"]
    infer_op = spec["paths"]["/v2/models/{name}/infer"]["post"]
    assert "security" in infer_op and spec["paths"]["/v2"]["get"]["security"]
    assert infer_op["responses"]["401"] == {"$ref": "#/components/responses/V2Error401"}
    assert {"400", "404", "413", "415"} <= set(infer_op["responses"])
    assert HEADER in infer_op["requestBody"]["description"]
    example = infer_op["requestBody"]["content"]["application/json"]["examples"]["iris"]["value"]
    assert infer(client, example).status_code == 200


# --- infer, JSON ---


@pytest.mark.parametrize("nested", [True, False])
def test_infer_equals_native_predict(client, nested):
    """Rows nested or flat (row-major) give native /predict's labels; the reply names the model and version."""
    tensor = matrix(IRIS_ROWS)
    if not nested:
        tensor["data"] = [v for row in IRIS_ROWS for v in row]
    r = infer(client, {"inputs": [tensor]})
    assert r.status_code == 200 and r.mimetype == "application/json"
    assert r.json == {
        "model_name": "iris",
        "model_version": "1",
        "outputs": [
            {"name": "predict", "datatype": "BYTES", "shape": [2], "data": native(client, IRIS_ROWS)["predictions"]}
        ],
    }
    assert r.headers["X-Cache"] == "OFF"  # the pipeline's headers, as native's


@pytest.mark.parametrize("shape", ["[n]", "[n, 1]"])
def test_one_input_per_feature_in_any_order(client, shape):
    """One input per feature, named after it and sent in any order, is the same request as the matrix."""
    columns = list(zip(*IRIS_ROWS))
    inputs = []
    for j in (2, 0, 3, 1):
        data = list(columns[j]) if shape == "[n]" else [[v] for v in columns[j]]
        dims = [2] if shape == "[n]" else [2, 1]
        inputs.append({"name": FEATURES[j], "shape": dims, "datatype": "FP64", "data": data})
    r = infer(client, {"inputs": inputs, "outputs": [{"name": "predict_proba"}]})
    assert r.status_code == 200, r.json
    expected = native(client, IRIS_ROWS, proba=True)["probabilities"]
    assert r.json["outputs"][0]["data"] == [p for row in expected for p in row.values()]


def test_per_feature_inputs_may_mix_datatypes(client):
    """Each input carries its own datatype."""
    columns = list(zip(*WHOLE_ROWS))
    types = ["INT8", "FP32", "UINT16", "BOOL"]
    inputs = [
        {"name": name, "shape": [3], "datatype": t, "data": [bool(v) for v in col] if t == "BOOL" else list(col)}
        for name, t, col in zip(FEATURES, types, columns)
    ]
    r = infer(client, {"inputs": inputs})
    expected = [[a, b, c, float(bool(d))] for a, b, c, d in WHOLE_ROWS]
    assert r.json["outputs"][0]["data"] == native(client, expected)["predictions"]


DATATYPES = ["FP64", "FP32", "FP16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"]


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("datatype", [*DATATYPES, "BOOL"])
def test_each_datatype_predicts_like_its_float_rows(client, datatype, binary):
    """Every numeric datatype, in JSON or as binary data, answers what native /predict does for the same values."""
    rows = [[1, 0, 1, 1], [0, 1, 0, 0]] if datatype == "BOOL" else WHOLE_ROWS
    np_type = {"BOOL": np.bool_, "FP64": np.float64, "FP32": np.float32, "FP16": np.float16}.get(datatype)
    array = np.array(rows, dtype=np_type or datatype.lower())
    tensor = triton.InferInput("input", list(array.shape), datatype).set_data_from_numpy(array, binary_data=binary)
    data, size = triton.InferenceServerClient.generate_request_body([tensor])
    headers = {**basic_auth(), **({HEADER: str(size)} if size is not None else {})}
    r = client.post(INFER, data=data, headers=headers)
    assert r.status_code == 200, r.data
    assert outputs(r)["predict"].astype(str).tolist() == native(client, array.astype(float).tolist())["predictions"]


def test_outputs_are_chosen_by_name_in_order(client):
    """No outputs: predict only; named: those, in the order asked; probabilities are native's, [n, n_classes]."""
    expected = native(client, IRIS_ROWS, proba=True)
    body = {"inputs": [matrix(IRIS_ROWS)], "outputs": [{"name": "predict_proba"}, {"name": "predict"}]}
    r = infer(client, body)
    proba, labels = r.json["outputs"]
    assert (proba["name"], proba["datatype"], proba["shape"]) == ("predict_proba", "FP64", [2, 3])
    assert proba["data"] == [p for row in expected["probabilities"] for p in row.values()]
    assert labels["data"] == expected["predictions"]
    only = infer(client, {"inputs": [matrix(IRIS_ROWS)], "outputs": [{"name": "predict_proba"}]})
    assert [o["name"] for o in only.json["outputs"]] == ["predict_proba"]
    assert [o["name"] for o in infer(client, {"inputs": [matrix(IRIS_ROWS)], "outputs": []}).json["outputs"]] == [
        "predict"
    ]


def test_id_is_echoed_and_absent_when_not_sent(client):
    """The request's id comes back as sent; a request without one gets a reply without one."""
    r = infer(client, {"id": "req-42 ☃", "inputs": [matrix(IRIS_ROWS)]})
    assert r.json["id"] == "req-42 ☃"
    assert "id" not in infer(client, {"inputs": [matrix(IRIS_ROWS)]}).json


def test_named_version_and_alias_answer(make_app, make_model_dir):
    """/versions/<v>/infer answers with that version, or the one an alias names; the reply says which."""
    root = make_model_dir({"iris": ["1", "2"]}, manifests={"iris": {"default": "2", "aliases": {"stable": "1"}}})
    client = make_app(MODEL_PATH="", MODEL_DIR=str(root)).test_client()
    body = {"inputs": [matrix(IRIS_ROWS)]}
    assert infer(client, body).json["model_version"] == "2"
    assert infer(client, body, "/v2/models/iris/versions/1/infer").json["model_version"] == "1"
    assert infer(client, body, "/v2/models/iris/versions/stable/infer").json["model_version"] == "1"
    assert client.get("/v2/models/iris", headers=basic_auth()).json["versions"] == ["1", "2"]
    assert client.get("/v2/models/iris/versions/stable", headers=basic_auth()).json["versions"] == ["1"]
    r = infer(client, body, "/v2/models/iris/versions/7/infer")
    assert r.status_code == 404 and "versions: 1, 2" in error_of(r)


def test_rows_share_the_cache_with_native(make_app, redis_url):
    """V2 goes through the one pipeline: rows it predicted are cache hits for native /predict, per row."""
    client = make_app(REDIS_URL=redis_url).test_client()
    assert infer(client, {"inputs": [matrix(IRIS_ROWS)]}).headers["X-Cache"] == "MISS"
    r = client.post("/predict", json={"features": IRIS_ROWS}, headers=basic_auth())
    assert (r.headers["X-Cache"], r.headers["X-Cache-Hits"]) == ("HIT", "2")
    again = infer(client, {"inputs": [matrix(IRIS_ROWS)]}, headers={"Cache-Control": "no-cache"})
    assert again.headers["X-Cache"] == "BYPASS"


# --- infer, binary ---


def test_binary_request_and_response(client):
    """Inputs as raw little-endian bytes after the JSON header; outputs back the same way, BYTES length-prefixed."""
    array = np.array(IRIS_ROWS, dtype="<f8")
    request = {
        "inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP64", "parameters": {"binary_data_size": 64}}],
        "outputs": [{"name": "predict", "parameters": {"binary_data": True}}, {"name": "predict_proba"}],
    }
    data, headers = binary_body(request, array.tobytes())
    r = client.post(INFER, data=data, headers=headers)  # no Content-Type, as tritonclient sends it
    assert r.status_code == 200 and r.mimetype == "application/octet-stream"
    length = int(r.headers[HEADER])
    header, raw = json.loads(r.data[:length]), r.data[length:]
    labels, proba = header["outputs"]
    assert labels == {
        "name": "predict",
        "datatype": "BYTES",
        "shape": [2],
        "parameters": {"binary_data_size": len(raw)},
    }
    expected = native(client, IRIS_ROWS, proba=True)
    decoded, at = [], 0
    while at < len(raw):
        (n,) = struct.unpack_from("<I", raw, at)
        decoded.append(raw[at + 4 : at + 4 + n].decode())
        at += 4 + n
    assert decoded == expected["predictions"]
    assert proba["data"] == [p for row in expected["probabilities"] for p in row.values()]  # JSON: not asked binary


def test_binary_data_output_asks_for_every_output_in_binary(client):
    """parameters.binary_data_output makes every output binary unless an output says otherwise."""
    data, headers = binary_body(
        {
            "parameters": {"binary_data_output": True},
            "inputs": [matrix(IRIS_ROWS)],
            "outputs": [{"name": "predict_proba"}, {"name": "predict", "parameters": {"binary_data": False}}],
        }
    )
    del headers[HEADER]  # all-JSON request, binary reply
    r = client.post(INFER, data=data, headers=headers)
    assert r.status_code == 200 and HEADER in r.headers
    got = outputs(r)
    expected = native(client, IRIS_ROWS, proba=True)
    assert got["predict"].tolist() == expected["predictions"]
    assert got["predict_proba"].tolist() == [list(p.values()) for p in expected["probabilities"]]
    header = json.loads(r.data[: int(r.headers[HEADER])])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 2 * 3 * 8}
    assert "data" in header["outputs"][1]


def test_binary_and_json_inputs_mix(client):
    """Some inputs binary, some JSON: the binary ones' bytes follow the header in the inputs' order."""
    columns = [np.array(c, dtype="<f8") for c in zip(*IRIS_ROWS)]
    inputs = []
    for j, name in enumerate(FEATURES):
        tensor = {"name": name, "shape": [2], "datatype": "FP64"}
        inputs.append(tensor | ({"data": columns[j].tolist()} if j == 1 else {"parameters": {"binary_data_size": 16}}))
    data, headers = binary_body({"inputs": inputs}, columns[0].tobytes(), columns[2].tobytes(), columns[3].tobytes())
    r = client.post(INFER, data=data, headers=headers)
    assert r.status_code == 200, r.json
    assert r.json["outputs"][0]["data"] == native(client, IRIS_ROWS)["predictions"]


def test_gzip_body_with_binary_tensors(client):
    """Content-Encoding: gzip inflates first; the header length counts the inflated JSON."""
    tensor = triton.InferInput("input", [2, 4], "FP64").set_data_from_numpy(np.array(IRIS_ROWS))
    data, size = triton.InferenceServerClient.generate_request_body([tensor])
    headers = {**basic_auth(), HEADER: str(size), "Content-Encoding": "gzip"}
    r = client.post(INFER, data=gzip.compress(data), headers=headers)
    assert r.status_code == 200
    assert outputs(r)["predict"].tolist() == [b"setosa", b"virginica"]  # no outputs named: tritonclient asks binary


# --- errors ---


def _bin(request: dict, payload: bytes = b"", length: str | None = None) -> tuple[bytes, dict]:
    """A binary request whose header may lie about its length."""
    data, headers = binary_body(request, payload)
    if length is not None:
        headers[HEADER] = length
    return data, headers


FP64_BIN = {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP64", "parameters": {"binary_data_size": 64}}]}
GOOD = np.array(IRIS_ROWS, dtype="<f8").tobytes()


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"", 400, "empty"),
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, 'JSON object, e.g. {"inputs"'),
        (json.dumps({"inputs": []}).encode(), 400, "non-empty list"),
        (json.dumps({"outputs": [{"name": "predict"}]}).encode(), 400, "'inputs'"),
        (json.dumps({"inputs": [matrix(IRIS_ROWS)], "input": 1}).encode(), 400, "unknown field 'input'"),
        (json.dumps({"inputs": [matrix(IRIS_ROWS)], "id": 7}).encode(), 400, "'id' must be a string"),
        (json.dumps({"inputs": [matrix(IRIS_ROWS, "FP8")]}).encode(), 400, "datatype must be one of"),
        (json.dumps({"inputs": [matrix(IRIS_ROWS) | {"datatype": {}}]}).encode(), 400, "datatype must be one of"),
        (json.dumps({"inputs": [matrix(IRIS_ROWS) | {"datatype": ["FP64"]}]}).encode(), 400, "datatype must be one of"),
        (json.dumps({"inputs": [matrix(IRIS_ROWS)], "model_version": {}}).encode(), 400, "'model_version' must be"),
        (json.dumps({"inputs": [matrix([["a", "b", "c", "d"]], "BYTES")]}).encode(), 400, "not BYTES"),
        (json.dumps({"inputs": [matrix(IRIS_ROWS) | {"shape": [3, 4]}]}).encode(), 400, "needs 12"),
        (json.dumps({"inputs": [matrix(IRIS_ROWS) | {"shape": [2, -4]}]}).encode(), 400, "shape must be"),
        (json.dumps({"inputs": [matrix([[1.0, 2.0, 3.0]])]}).encode(), 400, "the model expects 4"),
        (json.dumps({"inputs": [matrix([[1, 2, 3, 4.5]], "INT32")]}).encode(), 400, "whole numbers"),
        (json.dumps({"inputs": [matrix([[1, 2, 3, None]])]}).encode(), 400, "data[3] is null"),
        (json.dumps({"inputs": [matrix([[1, 0, 1, 2]], "BOOL")]}).encode(), 400, "true or false"),
        (json.dumps({"inputs": [matrix([[1, 2, 3, 300]], "INT8")]}).encode(), 400, "out of range for INT8"),
        (json.dumps({"inputs": [matrix([[1, 2, 3, -1]], "UINT32")]}).encode(), 400, "out of range for UINT32"),
        (json.dumps({"inputs": [matrix([[1, 2, 3, 1e6]], "FP16")]}).encode(), 400, "out of range for FP16"),
        (json.dumps({"inputs": [matrix(IRIS_ROWS) | {"data": 5}]}).encode(), 400, "data must be a list"),
        (json.dumps({"inputs": [matrix(IRIS_ROWS) | {"extra": 1}]}).encode(), 400, "unknown field 'extra'"),
        (
            json.dumps({"inputs": [{"name": "x", "shape": [2], "datatype": "FP64", "data": [1, 2]}]}).encode(),
            400,
            "missing 'sepal_length'",
        ),
        (
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": FEATURES[j],
                            "shape": [2 if j else 3],
                            "datatype": "FP64",
                            "data": [1.0] * (2 if j else 3),
                        }
                        for j in range(4)
                    ]
                }
            ).encode(),
            400,
            "different numbers of rows",
        ),
        (json.dumps({"inputs": [matrix(IRIS_ROWS) | {"shape": [2, 2, 2]}]}).encode(), 400, "one input of shape [n, 4]"),
        (
            json.dumps({"inputs": [matrix(IRIS_ROWS)], "outputs": [{"name": "labels"}]}).encode(),
            400,
            "names output 'labels'",
        ),
        (
            json.dumps({"inputs": [matrix(IRIS_ROWS)], "outputs": [{"name": "predict"}] * 2}).encode(),
            400,
            "a second time",
        ),
        (json.dumps({"inputs": [matrix(IRIS_ROWS)], "outputs": {"name": "predict"}}).encode(), 400, "must be a list"),
        (
            json.dumps(
                {"inputs": [matrix(IRIS_ROWS)], "outputs": [{"name": "predict", "parameters": {"binary_data": 1}}]}
            ).encode(),
            400,
            "binary_data must be true or false",
        ),
        (
            json.dumps(
                {"inputs": [matrix(IRIS_ROWS)], "outputs": [{"name": "predict", "parameters": {"classification": 2}}]}
            ).encode(),
            400,
            "classification",
        ),
        (json.dumps({"inputs": [matrix(IRIS_ROWS)], "parameters": {"sequence_id": 3}}).encode(), 400, "sequence"),
        (json.dumps({"inputs": [matrix(IRIS_ROWS)], "parameters": []}).encode(), 400, "must be an object"),
        (
            json.dumps({"inputs": [matrix(IRIS_ROWS) | {"parameters": {"shared_memory_region": "r"}}]}).encode(),
            400,
            "shared-memory",
        ),
        (json.dumps(FP64_BIN).encode(), 400, "no Inference-Header-Content-Length"),
        (json.dumps({"inputs": [matrix([[1.0] * 4] * 1001)]}).encode(), 413, "at most 1000"),
    ],
)
def test_refused_requests(client, body, status, says):
    """Each mistake is its status with a message saying how to fix it, in V2's {"error": "..."} shape."""
    r = client.post(INFER, data=body, headers=basic_auth())
    assert r.status_code == status
    assert says in error_of(r)


@pytest.mark.parametrize(
    ("request_and_headers", "says"),
    [
        (_bin(FP64_BIN, GOOD, length="abc"), "whole number"),
        (_bin(FP64_BIN, GOOD, length="0"), "it must count the JSON header"),
        (_bin(FP64_BIN, GOOD, length="99999"), "it must count the JSON header"),
        (_bin(FP64_BIN, GOOD, length="10"), "not valid JSON"),
        (_bin(FP64_BIN, GOOD + b"\0"), "add up to 64"),
        (_bin(FP64_BIN, GOOD[:-8]), "ends before"),
        (_bin({"inputs": [FP64_BIN["inputs"][0] | {"parameters": {"binary_data_size": 56}}]}, GOOD[:56]), "needs 64"),
        (_bin({"inputs": [FP64_BIN["inputs"][0] | {"data": IRIS_ROWS}]}, GOOD), "both data"),
        (_bin({"inputs": [FP64_BIN["inputs"][0] | {"parameters": {"binary_data_size": "64"}}]}, GOOD), "whole number"),
        (_bin(FP64_BIN, np.array([[1, 2, 3, np.nan]] * 2).tobytes()), "not finite"),
        (
            _bin(
                {"inputs": [FP64_BIN["inputs"][0] | {"datatype": "BOOL", "parameters": {"binary_data_size": 8}}]},
                bytes([1, 0, 2, 1, 0, 0, 1, 1]),
            ),
            "bytes 0 or 1",
        ),
    ],
)
def test_binary_headers_that_lie_are_refused(client, request_and_headers, says):
    """Lengths that disagree with the body, the shape or the data are 400s, never a misread tensor."""
    data, headers = request_and_headers
    r = client.post(INFER, data=data, headers=headers)
    assert r.status_code == 400
    assert says in error_of(r)


def test_errors_never_echo_the_request(client):
    """Messages name fields and counts, never values sent."""
    secret = "s3cr3t-value-123"
    for body in (
        {"inputs": [matrix([[1, 2, 3, secret]])]},
        {"inputs": [matrix(IRIS_ROWS, secret)]},
        {"inputs": [matrix(IRIS_ROWS)], "outputs": [{"name": "x" * 200}]},
    ):
        r = infer(client, body)
        assert r.status_code == 400 and secret not in r.text and "x" * 60 not in r.text


def test_unknown_model_and_bad_encodings(make_app):
    """404 for an unknown model or path; deflate (tritonclient's request compression) inflated, other encodings a
    415; 413 past MAX_BODY_BYTES; V2's shape."""
    client = make_app(MAX_CONTENT_LENGTH=2000).test_client()
    body = json.dumps({"inputs": [matrix(IRIS_ROWS)]}).encode()
    r = client.post("/v2/models/nope/infer", data=body, headers=basic_auth())
    assert r.status_code == 404 and "serves: iris" in error_of(r)
    r = client.get("/v2/no/such/route", headers=basic_auth())
    assert r.status_code == 404 and error_of(r)
    r = client.post(INFER, data=zlib.compress(body), headers={**basic_auth(), "Content-Encoding": "deflate"})
    assert r.status_code == 200 and r.json["outputs"][0]["data"] == ["setosa", "virginica"]
    r = client.post(INFER, data=body, headers={**basic_auth(), "Content-Encoding": "br"})
    assert r.status_code == 415 and "gzip" in error_of(r)
    r = client.post(INFER, data=b"x" * 2001, headers=basic_auth())
    assert r.status_code == 413 and error_of(r)
    r = client.post(INFER, data=b"\x1f\x8b broken", headers={**basic_auth(), "Content-Encoding": "gzip"})
    assert r.status_code == 400 and error_of(r)


# --- the real client against real gunicorn and Redis ---


@pytest.fixture
def triton_server(live_server, redis_url):
    """gunicorn (2 workers) serving iris with the Redis cache, and a tritonclient on it with default settings."""
    server = live_server(env={"REDIS_URL": redis_url})
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield server, client
    client.close()


def test_tritonclient_health_and_metadata(triton_server):
    """The client's health and metadata calls, credentials passed as headers; a missing model raises its 404."""
    _, client = triton_server
    assert client.is_server_live() and client.is_server_ready()  # public, like /health
    auth = basic_auth()
    assert client.get_server_metadata(headers=auth)["extensions"] == ["binary_tensor_data"]
    assert client.is_model_ready("iris", headers=auth) and client.is_model_ready("iris", "1", headers=auth)
    assert not client.is_model_ready("nope", headers=auth)
    meta = client.get_model_metadata("iris", headers=auth)
    assert meta["inputs"] == [{"name": "input", "datatype": "FP64", "shape": [-1, 4]}]
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("nope", headers=auth)
    assert e.value.status() == "404" and "serves: iris" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.get_server_metadata()
    assert e.value.status() == "401" and "credentials" in e.value.message()


def test_tritonclient_infers_binary_by_default(triton_server):
    """Default settings (binary inputs and outputs, no Content-Type): labels, then probabilities, equal native's;
    the rows it predicted are cache hits for native /predict."""
    server, client = triton_server
    client.register_plugin(BasicAuth(USER, KEY))
    tensor = triton.InferInput("input", [2, 4], "FP64")
    tensor.set_data_from_numpy(np.array(IRIS_ROWS))
    result = client.infer("iris", [tensor], request_id="live-1")
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("iris", "1", "live-1")
    assert response["outputs"][0]["parameters"]["binary_data_size"] > 0  # it came back binary
    native_answer = server.predict({"features": IRIS_ROWS, "probabilities": True}).json()
    assert [label.decode() for label in result.as_numpy("predict")] == native_answer["predictions"]
    cached = server.predict({"features": IRIS_ROWS})
    assert (cached.headers["X-Cache"], cached.headers["X-Cache-Hits"]) == ("HIT", "2")

    asked = [triton.InferRequestedOutput("predict_proba"), triton.InferRequestedOutput("predict")]
    result = client.infer("iris", [tensor], outputs=asked)
    probabilities = [list(p.values()) for p in native_answer["probabilities"]]
    assert result.as_numpy("predict_proba").tolist() == probabilities
    assert result.as_numpy("predict").shape == (2,)


def test_tritonclient_infers_json_and_fp32(triton_server):
    """binary_data=False on inputs and outputs gives the same answers in JSON; FP32 rows answer as their values."""
    server, client = triton_server
    rows32 = np.array(IRIS_ROWS, dtype=np.float32)
    columns = []
    for j, name in enumerate(FEATURES):
        tensor = triton.InferInput(name, [2], "FP32")
        columns.append(tensor.set_data_from_numpy(np.ascontiguousarray(rows32[:, j]), binary_data=False))
    asked = [triton.InferRequestedOutput(n, binary_data=False) for n in ("predict", "predict_proba")]
    result = client.infer("iris", columns[::-1], outputs=asked, headers=basic_auth())
    assert "binary_data_size" not in json.dumps(result.get_response())
    native_answer = server.predict({"features": rows32.astype(float).tolist(), "probabilities": True}).json()
    assert result.as_numpy("predict").tolist() == native_answer["predictions"]
    assert result.as_numpy("predict_proba").tolist() == [list(p.values()) for p in native_answer["probabilities"]]
    with pytest.raises(InferenceServerException) as e:
        client.infer("iris", columns[:3], headers=basic_auth())
    assert e.value.status() == "400" and "missing 'petal_width'" in e.value.message()


def test_tritonclient_names_a_version(live_server, make_model_dir):
    """model_version picks the version (or alias) that answers; the reply says which."""
    root = make_model_dir({"iris": ["1", "2"]}, manifests={"iris": {"default": "1", "aliases": {"canary": "2"}}})
    server = live_server(env={"MODEL_PATH": "", "MODEL_DIR": str(root)}, workers=1)
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        tensor = triton.InferInput("input", [2, 4], "FP64").set_data_from_numpy(np.array(IRIS_ROWS))
        for version, answered in (("", "1"), ("2", "2"), ("canary", "2")):
            result = client.infer("iris", [tensor], model_version=version, headers=basic_auth())
            assert result.get_response()["model_version"] == answered
        assert client.get_model_metadata("iris", "2", headers=basic_auth())["versions"] == ["2"]
        r = requests.post(f"{server.url}/v2/models/iris/versions/3/infer", data=b"{}", headers=basic_auth(), timeout=10)
        assert r.status_code == 404 and list(r.json()) == ["error"]
    finally:
        client.close()
