"""Per-model cache policy: on, off, or auto (Redis only where predicting a row costs more than a miss's round trips)."""

import pytest
import redis
from conftest import IRIS_ROWS, basic_auth, served_model

from app.cache import LOCAL_MAX_ROWS, Worth
from app.registry import MISS_ROUND_TRIPS, decide_cache


def post(client, path="/predict"):
    """POST the iris rows; the response."""
    return client.post(path, json={"features": IRIS_ROWS}, headers=basic_auth())


@pytest.mark.parametrize(
    ("trips_in_a_row", "tiers"), [(1e6, "redis"), (2.5, "redis"), (1.5, "local"), (1e-6, "local"), (None, "redis")]
)
def test_auto_weighs_a_row_against_a_miss_round_trips(make_app, trips_in_a_row, tiers):
    """auto keeps Redis where a row costs more than a miss's two round trips (lookup and store), the worker tier
    alone where it costs less, even where it costs more than one (a miss would pay two to save less than one hit
    gains), and Redis (failing open) when the round trip could not be measured; the figures say what was weighed."""
    model = served_model(make_app(CACHE_POLICY="on"))
    model.cache_policy = "auto"
    trip = None if trips_in_a_row is None else model.backend.row_seconds / trips_in_a_row
    decide_cache([model], lambda: trip)
    assert model.cache_tiers == tiers
    assert model.cache_figures["row_us"] == round(model.backend.row_seconds * 1e6, 1) > 0
    assert model.cache_figures.get("redis_round_trip_us") == (None if trip is None else round(trip * 1e6, 1))


def test_round_trip_is_measured_only_for_auto(make_app):
    """With no model on auto, startup never probes Redis (a hung one would cost a timeout at every start)."""
    probes = []
    model = served_model(make_app())
    decide_cache([model], lambda: probes.append(1))
    assert probes == [] and model.cache_tiers == "redis"


def test_auto_decision_is_served_as_shown(make_app, redis_url):
    """Under auto, /models shows the tiers and both figures, and requests use exactly those tiers: with the worker
    tier alone, Redis never sees a key and a repeat is still a HIT from memory."""
    app = make_app(REDIS_URL=redis_url, CACHE_POLICY="auto")
    client = app.test_client()
    shown = client.get("/models/iris/versions/1", headers=basic_auth()).json["cache"]
    assert shown["tiers"] == ("redis" if shown["row_us"] > MISS_ROUND_TRIPS * shown["redis_round_trip_us"] else "local")
    assert [post(client).headers["X-Cache"] for _ in range(2)] == ["MISS", "HIT"]
    keys = redis.Redis.from_url(redis_url).dbsize()
    assert keys == (2 if shown["tiers"] == "redis" else 0)


def test_local_tier_only_keeps_redis_out(make_app, redis_url):
    """A model whose tiers are local answers repeats from the worker's memory and never reads or writes Redis."""
    app = make_app(REDIS_URL=redis_url)
    served_model(app).cache_tiers = "local"
    client, server = app.test_client(), redis.Redis.from_url(redis_url)
    server.config_resetstat()
    assert [post(client).headers["X-Cache"] for _ in range(2)] == ["MISS", "HIT"]
    stats = server.info("commandstats")
    assert server.dbsize() == 0 and "cmdstat_mget" not in stats and "cmdstat_set" not in stats


def test_local_tier_skips_batches_larger_than_local_max_rows(make_app, redis_url):
    """With local tiers, a batch of more than LOCAL_MAX_ROWS rows is predicted, never kept: the same batch again is
    predicted again (OFF), while a small request's repeat is a HIT."""
    app = make_app(REDIS_URL=redis_url)
    served_model(app).cache_tiers = "local"
    client = app.test_client()
    big = {"features": [[5.0 + i / 10, 3.0, 1.5, 0.2] for i in range(LOCAL_MAX_ROWS + 1)]}
    sent = [client.post("/predict", json=big, headers=basic_auth()) for _ in range(2)]
    assert [r.headers["X-Cache"] for r in sent] == ["OFF", "OFF"]
    assert sent[0].json["predictions"] == sent[1].json["predictions"]
    small = {"features": big["features"][:LOCAL_MAX_ROWS]}
    assert [client.post("/predict", json=small, headers=basic_auth()).headers["X-Cache"] for _ in range(2)] == [
        "MISS",
        "HIT",
    ]


def test_worker_tier_alone_is_sampled_while_it_misses_and_used_again_once_rows_repeat(make_app, redis_url, monkeypatch):
    """On local tiers, a stream of new rows turns the worker's tier down to one request in SAMPLE_EVERY (the others
    skip it: OFF), and once rows repeat the samples find them and every request uses the tier again (HIT)."""
    monkeypatch.setattr(Worth, "WINDOW_ROWS", 8)
    monkeypatch.setattr(Worth, "SAMPLE_ROWS", 4)
    app = make_app(REDIS_URL=redis_url)
    served_model(app).cache_tiers = "local"
    client = app.test_client()

    def send(row):
        return client.post("/predict", json={"features": [row]}, headers=basic_auth()).headers["X-Cache"]

    new_rows = ([5.0 + i / 100, 3.0, 1.5, 0.2] for i in range(1000))
    assert [send(next(new_rows)) for _ in range(8)] == ["MISS"] * 8  # a window of misses...
    sampled = [send(next(new_rows)) for _ in range(4 * Worth.SAMPLE_EVERY)]  # ...then one request in SAMPLE_EVERY
    assert sampled == (["OFF"] * (Worth.SAMPLE_EVERY - 1) + ["MISS"]) * 4
    # Rows that repeat: the first sample stores the row, the next samples hit it, and the tier is back for all.
    repeated = [send(IRIS_ROWS[0]) for _ in range(5 * Worth.SAMPLE_EVERY)]
    assert repeated[-3:] == ["HIT"] * 3
    assert repeated.count("OFF") < 4 * Worth.SAMPLE_EVERY


def test_worker_tier_alone_stays_for_rows_that_repeat(make_app, redis_url, monkeypatch):
    """Requests that hit the worker's tier as often as they miss keep it for every request."""
    monkeypatch.setattr(Worth, "WINDOW_ROWS", 8)
    app = make_app(REDIS_URL=redis_url)
    served_model(app).cache_tiers = "local"
    client = app.test_client()
    rows = [[5.0 + i / 100, 3.0, 1.5, 0.2] for i in range(40)]
    # Each row twice in a row: half the requests hit, above MIN_HIT_RATE.
    outcomes = [
        client.post("/predict", json={"features": [row]}, headers=basic_auth()).headers["X-Cache"]
        for row in rows
        for _ in range(2)
    ]
    assert outcomes == ["MISS", "HIT"] * 40


def test_worker_tier_in_front_of_redis_is_always_used(make_app, redis_url, monkeypatch):
    """With Redis as a tier (cache on), a stream of new rows does not turn the worker's tier down: a repeat is still
    answered from the worker's memory, without asking Redis."""
    monkeypatch.setattr(Worth, "WINDOW_ROWS", 8)
    app = make_app(REDIS_URL=redis_url)
    assert served_model(app).cache_tiers == "redis"
    client, server = app.test_client(), redis.Redis.from_url(redis_url)
    for i in range(4 * Worth.WINDOW_ROWS):
        client.post("/predict", json={"features": [[5.0 + i / 100, 3.0, 1.5, 0.2]]}, headers=basic_auth())
    assert post(client).headers["X-Cache"] == "MISS"
    server.config_resetstat()
    assert post(client).headers["X-Cache"] == "HIT"
    assert "cmdstat_mget" not in server.info("commandstats")
