"""One JSON error shape for every failure, routing errors and crashes included."""

import gzip
import tracemalloc
import zlib

import pytest
import requests
from conftest import IRIS_ROWS, basic_auth, served_model


def assert_error_shape(r, status, code):
    """The body is exactly {"error": {code, message, request_id}} and the id matches the header."""
    assert r.status_code == status
    assert r.mimetype == "application/json"
    assert set(r.json) == {"error"}
    assert set(r.json["error"]) == {"code", "message", "request_id"}
    assert r.json["error"]["code"] == code
    assert r.json["error"]["request_id"] == r.headers["X-Request-ID"]


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [("GET", "/nope", 404, "not_found"), ("GET", "/predict", 405, "method_not_allowed"),
     ("DELETE", "/models", 405, "method_not_allowed"), ("POST", "/health", 405, "method_not_allowed")],
)  # fmt: skip
def test_routing_errors_are_json(client, method, path, status, code):
    """Unknown paths and wrong methods get JSON, never Flask's HTML page."""
    r = client.open(path, method=method, headers=basic_auth())
    assert_error_shape(r, status, code)
    assert b"<" not in r.data


def test_405_lists_allowed_methods(client):
    """A 405 says which methods the endpoint takes."""
    assert "POST" in client.get("/predict").headers["Allow"]


def test_crash_is_a_generic_500_logged_with_trace(app, capsys):
    """An unexpected exception reaches the caller as a generic 500; the trace goes to the log with the id."""

    class Broken:
        name = "broken"

        def predict(self, X, proba):
            raise RuntimeError("secret internal detail")

    served_model(app).backend = Broken()
    r = app.test_client().post("/predict", json={"features": IRIS_ROWS}, headers=basic_auth())
    assert_error_shape(r, 500, "internal_error")
    assert b"secret internal detail" not in r.data and b"Traceback" not in r.data
    out = capsys.readouterr().out
    assert "secret internal detail" in out and r.json["error"]["request_id"] in out


@pytest.mark.parametrize("status", [401, 413, 415, 400])
def test_client_errors_share_the_shape(make_app, status):
    """401, 413, 415 and 400 use the same shape as everything else."""
    client = make_app(MAX_CONTENT_LENGTH=100).test_client()
    if status == 401:
        r = client.post("/predict", json={"features": IRIS_ROWS})
    elif status == 413:
        r = client.post("/predict", json={"features": IRIS_ROWS * 10}, headers=basic_auth())
    elif status == 415:
        r = client.post("/predict", data="x", headers=basic_auth(), content_type="text/plain")
    else:
        r = client.post("/predict", data="{", headers=basic_auth(), content_type="application/json")
    code = {401: "unauthorized", 413: "payload_too_large", 415: "unsupported_media_type", 400: "invalid_json"}
    assert_error_shape(r, status, code[status])


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    """50 MB of zeros, gzipped to about 50 KB: far under MAX_BODY_BYTES on the wire, far over it inflated."""
    return gzip.compress(bytes(50_000_000), compresslevel=9)


def post_encoded(client, data: bytes, encoding: str):
    """POST a body with a Content-Encoding and the test user's credentials."""
    headers = {**basic_auth(), "Content-Encoding": encoding}
    return client.post("/predict", data=data, content_type="application/json", headers=headers)


def test_gzip_bomb_is_413_without_inflating_it(client, gzip_bomb):
    """MAX_BODY_BYTES holds for the inflated body too, and the server stops inflating at the limit."""
    assert len(gzip_bomb) < 100_000
    tracemalloc.start()
    try:
        r = post_encoded(client, gzip_bomb, "gzip")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_error_shape(r, 413, "payload_too_large")
    assert "MAX_BODY_BYTES" in r.json["error"]["message"]
    assert peak < 10_000_000  # inflating it all would hold 50 MB


@pytest.mark.parametrize(
    "data",
    [b"not gzip at all", gzip.compress(b'{"features": [[1, 2, 3, 4]]}')[:-12], gzip.compress(b"{}") + b"junk"],
    ids=["not-gzip", "cut-short", "trailing-junk"],
)
def test_corrupt_gzip_is_400_saying_so(client, data):
    """A body that says gzip but isn't is a 400 naming gzip, not a confusing JSON or UTF-8 error."""
    r = post_encoded(client, data, "gzip")
    assert_error_shape(r, 400, "invalid_gzip")
    assert "gzip" in r.json["error"]["message"]


def test_corrupt_deflate_is_400_saying_so(client):
    """A body that says deflate but is cut short is the same 400."""
    r = post_encoded(client, zlib.compress(b'{"features": [[1, 2, 3, 4]]}')[:-6], "deflate")
    assert_error_shape(r, 400, "invalid_gzip")
    assert "deflate" in r.json["error"]["message"]


@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip, gzip", "nonsense"])
def test_other_content_encodings_are_415_naming_gzip(client, encoding):
    """Only gzip and deflate are inflated; anything else is refused with the encodings that are accepted."""
    r = post_encoded(client, b'{"features": [[1, 2, 3, 4]]}', encoding)
    assert_error_shape(r, 415, "unsupported_media_type")
    assert "gzip" in r.json["error"]["message"]


def test_gzip_bomb_over_live_gunicorn_is_413(live_server, gzip_bomb):
    """Through gunicorn, chunked or not, a gzip body inflating past MAX_BODY_BYTES is a JSON 413; the worker goes on."""
    server = live_server(workers=1)
    headers = {**basic_auth(), "Content-Type": "application/json", "Content-Encoding": "gzip"}
    r = requests.post(server.url + "/predict", data=gzip_bomb, headers=headers, timeout=10)
    assert (r.status_code, r.json()["error"]["code"]) == (413, "payload_too_large")
    chunked = requests.post(server.url + "/predict", data=iter([gzip_bomb]), headers=headers, timeout=10)
    assert chunked.status_code == 413
    ok = gzip.compress(b'{"features": [[5.1, 3.5, 1.4, 0.2]]}')
    assert requests.post(server.url + "/predict", data=ok, headers=headers, timeout=10).json()["predictions"] == [
        "setosa"
    ]
