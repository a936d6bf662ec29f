"""POST /feedback: truths joined by request id to predictions kept in a real Redis, accuracy and MAE/RMSE over the
shared window, 404/410/409/400 for unknown, expired, repeated and mismatched feedback, fail-open predicts."""

import hashlib
import math

import pytest
import redis
import requests
from conftest import ADMIN, ADMIN_KEY, IRIS_ROWS, USERS, basic_auth, exported
from prometheus_client import REGISTRY
from sklearn.linear_model import LinearRegression

# Rows the demo model answers setosa, virginica, versicolor.
ROWS = [*IRIS_ROWS, [5.9, 2.8, 4.3, 1.3]]
ANSWERS = ["setosa", "virginica", "versicolor"]


@pytest.fixture
def fb_app(make_app, redis_url):
    """The demo model with Redis and feedback kept for a minute."""
    return make_app(REDIS_URL=redis_url, FEEDBACK_TTL=60)


def predict(client, rows=ROWS, request_id: str | None = None, headers: dict | None = None) -> str:
    """Predict rows; return the answer's request id."""
    sent = {**(headers or basic_auth()), **({"X-Request-ID": request_id} if request_id else {})}
    r = client.post("/predict", json={"features": rows}, headers=sent)
    assert r.status_code == 200, r.json
    return r.headers["X-Request-ID"]


def post(client, request_id, truth, headers: dict | None = None):
    """POST /feedback."""
    return client.post("/feedback", json={"request_id": request_id, "truth": truth}, headers=headers or basic_auth())


def count(name: str, **labels: str) -> float:
    """A counter's value now (0 before its first increment)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_truths_for_some_rows_give_the_accuracy(fb_app):
    """Two requests' predictions, truths for some of their rows (null for the rest): the reply and the exported
    gauge give the share of correct predictions over every row joined; the counters count rows and requests."""
    client = fb_app.test_client()
    rows_before = count("sibyl_feedback_rows_total", model="iris", version="1")
    joined_before = count("sibyl_feedback_requests_total", outcome="joined")
    first, second = predict(client), predict(client, ROWS[:2])
    predict(client)  # a third request, no feedback: it counts for nothing
    r = post(client, first, ["setosa", None, "versicolor"])
    assert r.status_code == 200, r.json
    assert r.json == {
        "request_id": first,
        "model": {"name": "iris", "version": "1"},
        "rows": 2,
        "window": {"rows": 2, "accuracy": 1.0},
    }
    r = post(client, second, ["versicolor", "virginica"])  # the first is wrong
    assert r.json["window"] == {"rows": 4, "accuracy": 0.75}
    assert exported("sibyl_accuracy", model="iris", version="1") == 0.75
    assert count("sibyl_feedback_rows_total", model="iris", version="1") - rows_before == 4
    assert count("sibyl_feedback_requests_total", outcome="joined") - joined_before == 2


def test_window_keeps_the_last_feedback_window_rows(make_app, redis_url):
    """FEEDBACK_WINDOW=3: the oldest rows leave the window as new ones arrive."""
    client = make_app(REDIS_URL=redis_url, FEEDBACK_TTL=60, FEEDBACK_WINDOW=3).test_client()
    assert post(client, predict(client), ["virginica", "virginica", "virginica"]).json["window"]["accuracy"] == 1 / 3
    window = post(client, predict(client), ANSWERS).json["window"]
    assert window == {"rows": 3, "accuracy": 1.0}


def test_kept_predictions_expire_after_feedback_ttl(fb_app, redis_url):
    """The predictions live FEEDBACK_TTL seconds, their tombstone a day longer: once Redis drops the predictions,
    feedback gets 410, not 404."""
    client = fb_app.test_client()
    request_id = predict(client)
    store = fb_app.extensions["sibyl.feedback"]
    data, tombstone = store.keys(request_id)
    server = redis.Redis.from_url(redis_url)
    assert 55 <= server.ttl(data) <= 60 and 86400 < server.ttl(tombstone) <= 86460
    before = count("sibyl_feedback_requests_total", outcome="expired")
    server.pexpire(data, 1)  # Redis expires it as it would at FEEDBACK_TTL
    while server.exists(data):
        pass
    r = post(client, request_id, ANSWERS)
    assert r.status_code == 410 and r.json["error"]["code"] == "feedback_expired"
    assert r.json["error"]["request_id"] == r.headers["X-Request-ID"]
    assert count("sibyl_feedback_requests_total", outcome="expired") - before == 1


def test_unknown_id_is_404_and_feedback_counts_once(fb_app):
    """An id never answered is 404; a second post for a joined request is 409 (it would count twice)."""
    client = fb_app.test_client()
    before = count("sibyl_feedback_requests_total", outcome="unknown")
    r = post(client, "never-answered-0001", ["setosa"])
    assert r.status_code == 404 and r.json["error"]["code"] == "request_not_found"
    assert count("sibyl_feedback_requests_total", outcome="unknown") - before == 1
    request_id = predict(client)
    assert post(client, request_id, ANSWERS).status_code == 200
    r = post(client, request_id, ANSWERS)
    assert r.status_code == 409 and r.json["error"]["code"] == "feedback_already_joined"


def test_row_count_mismatch_is_400_and_keeps_the_predictions(fb_app):
    """Truths for a different number of rows: 400 saying how many; the predictions stay for a correct post."""
    client = fb_app.test_client()
    request_id = predict(client)
    before = count("sibyl_feedback_requests_total", outcome="mismatch")
    r = post(client, request_id, ANSWERS[:2])
    assert r.status_code == 400 and r.json["error"]["code"] == "row_count_mismatch"
    assert "3 row(s)" in r.json["error"]["message"]
    assert count("sibyl_feedback_requests_total", outcome="mismatch") - before == 1
    assert post(client, request_id, ANSWERS).status_code == 200


def test_only_the_requester_or_an_admin_may_answer(make_app, redis_url):
    """Another user's request reads as unknown (404: its existence is not confirmed); an admin may answer it."""
    users = USERS + ",bob:sha256:" + hashlib.sha256(b"bob-key-0123456789").hexdigest()
    client = make_app(REDIS_URL=redis_url, FEEDBACK_TTL=60, SIBYL_USERS=users).test_client()
    request_id = predict(client, request_id="caller-chosen-id-1")
    r = post(client, request_id, ANSWERS, headers=basic_auth("bob", "bob-key-0123456789"))
    assert r.status_code == 404 and r.json["error"]["code"] == "request_not_found"
    assert post(client, request_id, ANSWERS, headers=basic_auth(ADMIN, ADMIN_KEY)).status_code == 200


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"request_id": "abc"}, "exactly 'request_id' and 'truth'"),
        ({"request_id": "abc", "truth": ["setosa"], "model": "iris"}, "exactly 'request_id' and 'truth'"),
        ({"request_id": "no spaces", "truth": ["setosa"]}, "X-Request-ID"),
        ({"request_id": 7, "truth": ["setosa"]}, "X-Request-ID"),
        ({"request_id": "abc", "truth": []}, "a list of 1 to 1000 values"),
        ({"request_id": "abc", "truth": "setosa"}, "a list of 1 to 1000 values"),
        ({"request_id": "abc", "truth": [["setosa"]]}, "not a list or an object"),
        ({"request_id": "abc", "truth": [None, None]}, "only nulls"),
    ],
)
def test_bad_bodies_are_400(fb_app, body, words):
    """A body that is not {"request_id", "truth": [...]} is a 400 saying what it takes, before any lookup."""
    r = fb_app.test_client().post("/feedback", json=body, headers=basic_auth())
    assert r.status_code == 400 and r.json["error"]["code"] == "invalid_feedback"
    assert words in r.json["error"]["message"]


def test_a_label_the_model_never_answers_is_400(fb_app):
    """A classifier's truth must be one of its classes (compared as text)."""
    client = fb_app.test_client()
    r = post(client, predict(client), ["setosa", "daisy", None])
    assert r.status_code == 400 and "'daisy' is not one of the model's classes" in r.json["error"]["message"]


def test_regressor_feedback_gives_mae_and_rmse(make_model, make_app, redis_url):
    """A regressor's truths give the mean absolute and root mean squared error, exported per version."""
    path = make_model(LinearRegression(), name="price", version="4", classify=False)
    client = make_app(MODEL_PATH=str(path), REDIS_URL=redis_url, FEEDBACK_TTL=60).test_client()
    r = client.post("/predict", json={"features": [[0.5, 1.0], [2.0, -1.0]]}, headers=basic_auth())
    predicted = r.json["predictions"]
    truth = [predicted[0] + 1.0, predicted[1] - 3.0]
    window = post(client, r.headers["X-Request-ID"], truth).json["window"]
    assert window["rows"] == 2 and math.isclose(window["mae"], 2.0) and math.isclose(window["rmse"], math.sqrt(5))
    assert math.isclose(exported("sibyl_regression_mae", model="price", version="4"), 2.0)
    assert math.isclose(exported("sibyl_regression_rmse", model="price", version="4"), math.sqrt(5))
    r = post(client, predict(client, [[0.0, 0.0]]), ["cheap"])
    assert r.status_code == 400 and "finite numbers" in r.json["error"]["message"]


def test_feedback_off_keeps_nothing_and_says_so(make_app, redis_url):
    """FEEDBACK_TTL=0 (the default): predicts write no feedback keys, and POST /feedback is a 404 naming the
    setting; FEEDBACK_TTL without REDIS_URL stops startup with one line."""
    from app.errors import StartupError

    client = make_app(REDIS_URL=redis_url, CACHE_ENABLED=False).test_client()
    predict(client)
    assert redis.Redis.from_url(redis_url).keys("*feedback*") == []
    r = post(client, "0123456789abcdef", ["setosa"])
    assert r.status_code == 404 and r.json["error"]["code"] == "feedback_off"
    with pytest.raises(StartupError, match="FEEDBACK_TTL needs REDIS_URL"):
        make_app(FEEDBACK_TTL=60)


def test_feedback_works_with_the_cache_off(make_app, redis_url):
    """CACHE_ENABLED=false with REDIS_URL: feedback still keeps its predictions there (its own client)."""
    client = make_app(REDIS_URL=redis_url, FEEDBACK_TTL=60, CACHE_ENABLED=False).test_client()
    assert post(client, predict(client), ANSWERS).json["window"]["accuracy"] == 1.0


def test_redis_outage_serves_predictions_and_answers_feedback_503(make_app, own_redis):
    """Redis down: predicts answer 200 as ever (fail-open); feedback cannot be joined, so it is a 503."""
    server = own_redis()
    client = make_app(REDIS_URL=server.url, FEEDBACK_TTL=60, CACHE_TIMEOUT_MS=200).test_client()
    request_id = predict(client)
    server.stop()
    predict(client)
    r = post(client, request_id, ANSWERS)
    assert r.status_code == 503 and r.json["error"]["code"] == "feedback_unavailable"


def test_cross_worker_join_on_live_gunicorn(live_server, redis_url):
    """Predictions answered by each of two gunicorn workers are joined by the other worker: the kept predictions
    and the window live in Redis, not in a worker."""
    server = live_server(env={"REDIS_URL": redis_url, "FEEDBACK_TTL": "60"}, workers=2)
    # Held requests pin workers (tests/conftest.py HeldRequest): with one worker held, a request reaches the other.
    first = server.held_predict({"features": [ROWS[0]]})
    assert server.predict({"features": [ROWS[1]]}, {"X-Request-ID": "live-1"}).status_code == 200
    second = server.held_predict({"features": [ROWS[0]]})  # the worker that answered live-1: the only idle one
    first.finish()
    assert server.predict({"features": [ROWS[1]]}, {"X-Request-ID": "live-2"}).status_code == 200
    second.finish()
    lines = {line["request_id"]: line["pid"] for line in server.request_lines()}
    by_pid = {lines["live-1"]: "live-1", lines["live-2"]: "live-2"}
    assert len(by_pid) == 2 and set(by_pid) == set(server.workers())
    held = server.held_predict({"features": [ROWS[0]]})  # pins one worker: both posts reach the other
    answers = [
        requests.post(
            server.url + "/feedback", json={"request_id": rid, "truth": [truth]}, headers=basic_auth(), timeout=10
        )
        for rid, truth in zip(by_pid.values(), ["virginica", "setosa"])
    ]
    held.finish()
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    assert answers[1].json()["window"] == {"rows": 2, "accuracy": 0.5}
    lines = {line["request_id"]: line["pid"] for line in server.request_lines()}
    (joined_on,) = {lines[r.headers["X-Request-ID"]] for r in answers}  # the free worker took both posts
    predicted_elsewhere = [pid for pid in by_pid if pid != joined_on]
    assert len(predicted_elsewhere) == 1  # so one join read predictions another worker kept
