"""The common POST /predict answered around Flask's dispatch (app.direct): the same status, headers, body, log line
and metrics as the Flask route gives the same request; everything else is handed to Flask untouched."""

import gzip
import json

import pytest
from conftest import ADMIN, ADMIN_KEY, IRIS_ROWS, KEY, USER, basic_auth
from prometheus_client.parser import text_string_to_metric_families

from app import direct
from tests.support.servers import json_lines, requests_in

# Bodies that exercise each way the route answers: rows, probabilities, a wrong width, an unknown field, a boolean
# value, too many rows (413), and bytes that are not JSON.
BODIES = [
    {"features": IRIS_ROWS},
    {"instances": IRIS_ROWS, "probabilities": True},
    {"features": [[1, 2]]},
    {"rows": IRIS_ROWS},
    {"features": [[True, 1, 2, 3]]},
    {"features": IRIS_ROWS * 3},
    b"{not json",
]
CSV = b"sepal_length,sepal_width,petal_length,petal_width\n5.1,3.5,1.4,0.2\n"


@pytest.fixture
def answered_here(monkeypatch) -> list[str]:
    """The request ids DirectPredict answered itself (not handed to Flask)."""
    seen = []
    answer = direct.DirectPredict._predict

    def spy(self, environ, *rest):
        seen.append(environ.get("HTTP_X_REQUEST_ID"))
        return answer(self, environ, *rest)

    monkeypatch.setattr(direct.DirectPredict, "_predict", spy)
    return seen


def _post(client, body, content_type: str, request_id: str, **headers):
    data = body if isinstance(body, bytes) else json.dumps(body)
    sent = {**basic_auth(), "Content-Type": content_type, "X-Request-ID": request_id, **headers}
    return client.post("/predict", data=data, headers=sent)


def _seen(response, line: dict) -> tuple:
    """What a caller and an operator see of one request, but its timings."""
    headers = {k: v for k, v in response.headers.items() if k != "Server-Timing"}
    fields = {k: v for k, v in line.items() if k not in ("time", "duration_ms")}
    return response.status, headers, response.get_data(), fields


@pytest.mark.parametrize(
    "cache_control", [None, "no-store", "No-Cache"], ids=["no-cache-configured", "no-store", "bypass"]
)
def test_answers_like_the_flask_route(make_app, redis_url, capsys, answered_here, cache_control):
    """Each body, sent once as plain application/json (answered here) and once with a charset parameter (which only
    Flask's route takes), gets the same status, headers, body and request log line; both are counted alike. With
    Redis, Cache-Control keeps the first answer from making the second a hit (no-store) or skips the lookup (no-cache),
    both honoured here."""
    app = make_app(REDIS_URL=redis_url if cache_control else "", MAX_ROWS=4)
    client = app.test_client()
    extra = {"Cache-Control": cache_control} if cache_control else {}
    for i, body in enumerate(BODIES):
        capsys.readouterr()
        here = _post(client, body, "application/json", f"direct-{i}", **extra)
        there = _post(client, body, "application/json; charset=utf-8", f"direct-{i}", **extra)
        lines = requests_in(json_lines(capsys.readouterr().out))
        assert len(lines) == 2
        assert _seen(here, lines[0]) == _seen(there, lines[1]), body
        assert here.headers["Server-Timing"].startswith("app;dur=")
    assert answered_here == [f"direct-{i}" for i in range(len(BODIES))]
    # Each form counted under the route's one endpoint and protocol, by status.
    assert _predicts_counted(client) == {"200": 4, "400": 8, "413": 2}


def _predicts_counted(client) -> dict[str, float]:
    """sibyl_requests_total for the native predict route, by status, from GET /metrics."""
    text = client.get("/metrics", headers=basic_auth(ADMIN, ADMIN_KEY)).get_data(as_text=True)
    counted = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "sibyl_requests_total" and labels["endpoint"] == "native.predict":
                assert (labels["protocol"], labels["method"]) == ("native", "POST")
                counted[labels["status"]] = counted.get(labels["status"], 0) + sample.value
    return counted


def test_hands_everything_else_to_flask(make_app, answered_here, capsys):
    """A query string, gzip, another media type, a bearer token, a browser's cross-site headers and refused
    credentials reach Flask, which answers each as it always has."""
    client = make_app().test_client()
    body = json.dumps({"features": IRIS_ROWS}).encode()
    auth = basic_auth()
    json_type = {"Content-Type": "application/json"}
    cases = [
        ("/predict?probabilities=true", body, {**auth, **json_type}, 200),
        ("/predict", gzip.compress(body), {**auth, **json_type, "Content-Encoding": "gzip"}, 200),
        ("/predict", CSV, {**auth, "Content-Type": "text/csv"}, 200),
        ("/predict", body, {"Authorization": f"Bearer {KEY}", **json_type}, 200),
        ("/predict", body, {**auth, **json_type, "Origin": "https://elsewhere.example"}, 403),
        ("/predict", body, {**basic_auth(USER, "wrong-key"), **json_type}, 401),
        ("/predict", body, {"Authorization": "Basic !!!", **json_type}, 401),
        ("/predict", body, json_type, 401),
    ]
    for path, data, headers, status in cases:
        r = client.post(path, data=data, headers=headers)
        assert r.status_code == status, (path, headers, r.get_data())
        assert r.is_json
    assert client.post("/predict", data=body, headers={**auth, **json_type}).status_code == 200
    assert len(answered_here) == 1  # only the last one was answered here
    r = client.post("/predict", data=body, headers={**basic_auth(USER, "wrong-key"), **json_type})
    assert r.headers["WWW-Authenticate"] == 'Basic realm="sibyl"'  # flask-httpauth's 401, as before


def test_refused_logins_are_counted_once(make_app, redis_url):
    """Credentials that don't check out go to Flask before anything is counted: with a limit of 2 refused logins a
    minute, the third wrong key is the first 429, as on every other route."""
    client = make_app(REDIS_URL=redis_url, RATE_LIMIT_LOGIN_FAILURES="2/minute").test_client()
    wrong = {**basic_auth(USER, "wrong-key"), "Content-Type": "application/json"}
    body = json.dumps({"features": IRIS_ROWS})
    assert [client.post("/predict", data=body, headers=wrong).status_code for _ in range(3)] == [401, 401, 429]


def test_a_crash_is_a_logged_500_in_the_one_shape(make_app, monkeypatch, capsys, answered_here):
    """A bug on this path answers 500 internal_error with the request id, and logs the trace under that id."""
    app = make_app()
    model = app.extensions["sibyl.registry"].resolve("iris")

    def broken(X, proba):
        raise RuntimeError("a bug")

    monkeypatch.setattr(model.backend, "predict", broken)
    r = app.test_client().post("/predict", json={"features": IRIS_ROWS}, headers=basic_auth())
    assert answered_here and r.status_code == 500
    assert r.json["error"]["code"] == "internal_error"
    assert r.json["error"]["request_id"] == r.headers["X-Request-ID"]
    out = capsys.readouterr().out
    assert "RuntimeError: a bug" in out and r.headers["X-Request-ID"] in out
    assert "a bug" not in r.get_data(as_text=True)
