"""GET /status: each model version's figures, read from the metrics every worker writes."""

import math

import pytest
import requests
from conftest import ADMIN, ADMIN_KEY, IRIS_ROWS, KEY, USER, basic_auth

from app.status import _quantile

ADMIN_AUTH = basic_auth(ADMIN, ADMIN_KEY)


def figures(client_or_url, headers=ADMIN_AUTH) -> dict:
    """GET /status as the admin, by the test client or over HTTP; the first model's figures."""
    if isinstance(client_or_url, str):
        r = requests.get(client_or_url + "/status", headers=headers, timeout=10)
        body = r.json()
    else:
        r = client_or_url.get("/status", headers=headers)
        body = r.json
    assert r.status_code == 200, body
    (model,) = body["models"]
    return model


def test_status_counts_requests_errors_rows_and_cache_outcomes(make_app, redis_url):
    """Requests that reached the version (errors among them), rows answered and the cache's outcomes, per version."""
    client = make_app(REDIS_URL=redis_url).test_client()
    for _ in range(3):  # one miss, then hits
        assert client.post("/predict", json={"features": IRIS_ROWS}, headers=basic_auth()).status_code == 200
    assert client.post("/predict", json={"features": [[1, 2]]}, headers=basic_auth()).status_code == 400
    assert client.post("/predict", json={"features": IRIS_ROWS}).status_code == 401  # reached no model
    model = figures(client)
    assert (model["name"], model["version"]) == ("iris", "1")
    assert (model["requests"], model["errors"], model["error_rate"]) == (4, 1, 0.25)
    assert model["rows"] == 6
    assert model["cache"] == {"requests": 3, "hit_ratio": 2 / 3, "outcomes": {"miss": 1, "hit": 2}}
    assert 0 < model["latency_ms"]["p50"] <= model["latency_ms"]["p99"]


def test_status_before_any_request_has_no_rates(make_app):
    """No traffic yet: zero counts, and rates and latencies are null rather than a made-up 0."""
    model = figures(make_app().test_client())
    assert (model["requests"], model["error_rate"], model["cache"]["hit_ratio"]) == (0, None, None)
    assert model["latency_ms"] == {"p50": None, "p99": None}


@pytest.mark.parametrize(("user", "key", "status"), [(None, None, 401), (USER, KEY, 403)])
def test_status_needs_the_metrics_or_admin_role(client, user, key, status):
    """The same figures /metrics serves, so the same roles: no key is a 401, a predict-only key a 403 saying which."""
    r = client.get("/status", headers=basic_auth(user, key) if user else {})
    assert r.status_code == status
    if status == 403:
        assert "metrics role" in r.json["error"]["message"]


def test_quantile_interpolates_within_its_bucket_as_prometheus_does():
    """p50 and p99 from cumulative buckets, linear within the bucket the rank falls in; the +Inf bucket answers its
    lower bound; no observations, no figure."""
    buckets = {0.001: 0.0, 0.002: 10.0, 0.005: 20.0, math.inf: 20.0}
    assert _quantile(0.5, buckets) == 2.0
    assert _quantile(0.99, buckets) == pytest.approx(4.94)
    assert _quantile(0.99, {0.001: 5.0, math.inf: 10.0}) == 1.0
    assert _quantile(0.5, {0.001: 0.0, math.inf: 0.0}) is None


def test_live_status_sums_every_worker_and_shows_drift_once_a_window_fills(live_server):
    """Under gunicorn with 2 workers, /status counts every request whichever worker answered it; the demo ships
    training statistics, so once a worker's drift window fills, the prediction's and each feature's PSI appear."""
    server = live_server(env={"DRIFT_WINDOW": "100"}, workers=2)
    fresh = figures(server.url)
    assert fresh["drift"] is None  # no rows yet: no score
    assert fresh["feedback"] == {"rows": 0, "accuracy": None, "mae": None, "rmse": None}
    held = server.held_predict({"features": IRIS_ROWS})  # pins one worker, so the rest reach the other
    for _ in range(10):
        assert server.predict({"features": IRIS_ROWS}).status_code == 200
    assert server.predict({"features": [IRIS_ROWS[i % 2] for i in range(100)]}).status_code == 200
    assert held.finish()[0] == 200
    model = figures(server.url)
    assert (model["requests"], model["rows"], model["errors"]) == (12, 122, 0)
    assert len({line["pid"] for line in server.request_lines()}) == 2  # both workers answered some
    assert set(model["drift"]["features"]) == {"sepal_length", "sepal_width", "petal_length", "petal_width"}
    assert model["drift"]["prediction_psi"] > 0.25  # two rows repeated are nothing like the training set
