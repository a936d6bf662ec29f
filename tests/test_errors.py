"""One JSON error shape for every failure, routing errors and crashes included."""

import pytest
from conftest import IRIS_ROWS, basic_auth


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

    app.extensions["sibyl.model"].backend = Broken()
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
