"""Abuse limits: requests per user by role and refused logins per address, shared through Redis; 429 with
Retry-After in each protocol's error shape; fail-open predictions; a client address behind trusted proxies."""

import hashlib
import json
import statistics
import time
from time import perf_counter

import pytest
import requests
from conftest import ADMIN, ADMIN_KEY, IRIS_ROWS, KEY, USER, USERS, basic_auth

from app import limits

BODY = {"features": IRIS_ROWS[:1]}
PROM, PROM_KEY = "prom", "prom-test-key-0123456789abcdef"
WITH_METRICS_USER = f"{USERS},{PROM}:sha256:{hashlib.sha256(PROM_KEY.encode()).hexdigest()}:metrics"
WRONG = basic_auth(USER, "not-the-key")
UNKNOWN = basic_auth("mallory", "not-the-key")
# Each protocol's predict route and a body it takes.
ROUTES = {
    "native": ("/predict", BODY),
    "mlflow": ("/invocations", {"inputs": IRIS_ROWS[:1]}),
    "kserve": ("/v1/models/iris:predict", {"instances": IRIS_ROWS[:1]}),
    "v2": ("/v2/models/iris/infer", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64",
                                                 "data": IRIS_ROWS[0]}]}),
}  # fmt: skip


def limited(make_app, redis_url="", SIBYL_USERS=USERS, **limits):
    """The app with these limits (the rest off) counting in redis_url's Redis (none: per worker)."""
    rates = {f"RATE_LIMIT_{kind.upper()}": rate for kind, rate in limits.items()}
    return make_app(REDIS_URL=redis_url, SIBYL_USERS=SIBYL_USERS, **rates)


def audit_lines(text: str, reason: str) -> list[dict]:
    """The audit lines with this reason in captured stdout."""
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "audit" and line.get("reason") == reason]


def test_user_over_the_limit_gets_429_with_retry_after_and_others_pass(make_app, redis_url):
    """A user past their limit gets 429 (code rate_limited) with Retry-After; another user is not affected."""
    client = limited(make_app, redis_url, predict="3/minute", admin="3/minute").test_client()
    assert [client.post("/predict", json=BODY, headers=basic_auth()).status_code for _ in range(3)] == [200] * 3
    resp = client.post("/predict", json=BODY, headers=basic_auth())
    assert resp.status_code == 429 and resp.json["error"]["code"] == "rate_limited"
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert "3 requests per minute" in resp.json["error"]["message"]
    assert client.post("/predict", json=BODY, headers=basic_auth(ADMIN, ADMIN_KEY)).status_code == 200


@pytest.mark.parametrize("protocol", ROUTES)
def test_429_comes_in_each_protocols_error_shape(make_app, redis_url, protocol):
    """A 429 has the same shape as that protocol's other errors (its 401), as every error does."""
    client = limited(make_app, redis_url, predict="1/minute").test_client()
    path, body = ROUTES[protocol]
    assert client.post(path, json=body, headers=basic_auth()).status_code == 200
    refused = client.post(path, json=body, headers=basic_auth())
    unauthorized = client.post(path, json=body, headers=WRONG)
    assert (refused.status_code, unauthorized.status_code) == (429, 401)
    assert refused.headers["Content-Type"] == "application/json" and "Retry-After" in refused.headers

    def shape(value):
        return {k: shape(v) for k, v in value.items()} if isinstance(value, dict) else type(value).__name__

    assert shape(refused.json) == shape(unauthorized.json)


@pytest.mark.parametrize(
    ("user", "key", "allowed"),
    [(USER, KEY, 2), (ADMIN, ADMIN_KEY, 4), (PROM, PROM_KEY, 1)],
    ids=["predict", "admin", "metrics"],
)
def test_each_role_has_its_own_limit(make_app, redis_url, user, key, allowed):
    """A user's limit is their highest role's: RATE_LIMIT_ADMIN, else RATE_LIMIT_METRICS, else RATE_LIMIT_PREDICT."""
    limits = {"predict": "2/minute", "admin": "4/minute", "metrics": "1/minute"}
    client = limited(make_app, redis_url, SIBYL_USERS=WITH_METRICS_USER, **limits).test_client()
    statuses = [client.post("/predict", json=BODY, headers=basic_auth(user, key)).status_code for _ in range(6)]
    assert statuses == [200] * allowed + [429] * (6 - allowed)


def test_failed_logins_throttle_the_address_before_any_key_is_checked(make_app, redis_url, capsys):
    """Past RATE_LIMIT_LOGIN_FAILURES refused logins, an address gets 429 whatever it sends, a valid key too (so its
    guesses tell it nothing); another address is not affected; one audit line marks the burst."""
    client = limited(make_app, redis_url, login_failures="3/minute").test_client()
    statuses = [client.post("/predict", json=BODY, headers=WRONG).status_code for _ in range(3)]
    assert statuses == [401] * 3
    for headers in (WRONG, UNKNOWN, basic_auth(), {"Authorization": f"Bearer {KEY}"}):
        resp = client.post("/predict", json=BODY, headers=headers)
        assert resp.status_code == 429 and resp.json["error"]["code"] == "too_many_failed_logins"
        assert 1 <= int(resp.headers["Retry-After"]) <= 60
    elsewhere = {"REMOTE_ADDR": "192.0.2.7"}
    assert client.post("/predict", json=BODY, headers=basic_auth(), environ_base=elsewhere).status_code == 200
    # No credentials at all is not a refused login (a browser's first request), and is not throttled either.
    assert client.post("/predict", json=BODY).status_code == 401
    lines = audit_lines(capsys.readouterr().out, "login rate limit")
    assert len(lines) == 1 and lines[0]["remote_addr"] == "127.0.0.1" and lines[0]["user"] is None


def test_a_throttled_address_stays_throttled_when_its_counter_leaves_the_workers_view(make_app, redis_url, monkeypatch):
    """A worker keeps a bounded view of counters (MAX_LOCAL_KEYS; a flood of addresses pushes the oldest out). A
    request's own counters are judged from what it counted, even when counting its user pushed its address out of
    the view: a throttled address gets 429 with a valid key too."""
    monkeypatch.setattr(limits, "MAX_LOCAL_KEYS", 1)
    client = limited(make_app, redis_url, login_failures="2/minute", predict="1000/minute").test_client()
    assert [client.post("/predict", json=BODY, headers=WRONG).status_code for _ in range(3)] == [401, 401, 429]
    resp = client.post("/predict", json=BODY, headers=basic_auth())
    assert resp.status_code == 429 and resp.json["error"]["code"] == "too_many_failed_logins"


def test_unknown_user_and_wrong_key_get_identical_answers(make_app, redis_url):
    """Status, body and headers (but the request id and timing) are the same for an unknown user and a wrong key,
    before and after the address is throttled."""
    client = limited(make_app, redis_url, login_failures="2/minute").test_client()

    def answer(headers):
        resp = client.post("/predict", json=BODY, headers={**headers, "X-Request-ID": "same"})
        kept = {k: v for k, v in resp.headers.items() if k not in ("Server-Timing", "Retry-After")}
        return resp.status_code, resp.get_data(), kept

    first = answer(WRONG), answer(UNKNOWN)  # the limit's 2 refusals: 401s
    then = answer(UNKNOWN), answer(WRONG)  # past it: 429s
    assert first[0] == first[1] and first[0][0] == 401
    assert then[0] == then[1] and then[0][0] == 429


def test_unknown_user_costs_what_a_wrong_key_costs(make_app, redis_url):
    """Over 2,000 tries each, interleaved, an unknown user's refusal takes as long as a known user's wrong key (the
    same digest compare and the same Redis round trip): medians within 25%, a generous bound for a shared box."""
    client = limited(make_app, redis_url, login_failures="999999999/day").test_client()
    times = {"wrong": [], "unknown": []}
    for _ in range(2000):
        for name, headers in (("wrong", WRONG), ("unknown", UNKNOWN)):
            start = perf_counter()
            assert client.get("/models", headers=headers).status_code == 401
            times[name].append(perf_counter() - start)
    wrong, unknown = statistics.median(times["wrong"]), statistics.median(times["unknown"])
    assert 0.8 < unknown / wrong < 1.25, (wrong, unknown)


def test_keys_are_prefixed_digests_that_expire(make_app, redis_url, redis_server):
    """Every limit key starts with CACHE_PREFIX, has an expiry, and holds no user name, key or address."""
    client = limited(make_app, redis_url, predict="5/minute", login_failures="5/minute").test_client()
    client.post("/predict", json=BODY, headers=basic_auth())
    client.post("/predict", json=BODY, headers=WRONG)
    redis = redis_server.client()
    keys = [key.decode() for key in redis.keys("sibyl:limit:*")]
    assert len(keys) == 2 and all(key.startswith("sibyl:") for key in map(bytes.decode, redis.keys("*")))
    assert all(0 < redis.ttl(key) <= 60 for key in keys)
    assert not [key for key in keys if any(s in key for s in (USER, KEY, "not-the-key", "127.0.0.1"))]


def test_redis_outage_lets_predictions_through_and_still_counts_refused_logins(make_app, own_redis):
    """Redis killed: the per-user limit fails open (200s past it, as the cache serves uncached) for a user the worker
    has not seen over it, while refused logins are counted in the worker, so a Redis outage opens no window for
    guessing. A user Redis already counted past the limit stays refused until the window ends."""
    server = own_redis()
    client = limited(
        make_app, server.url, predict="2/minute", admin="2/minute", login_failures="2/minute"
    ).test_client()
    assert [client.post("/predict", json=BODY, headers=basic_auth()).status_code for _ in range(3)] == [200, 200, 429]
    server.stop()
    admin = basic_auth(ADMIN, ADMIN_KEY)
    assert [client.post("/predict", json=BODY, headers=admin).status_code for _ in range(5)] == [200] * 5
    assert client.post("/predict", json=BODY, headers=basic_auth()).status_code == 429
    statuses = [client.post("/predict", json=BODY, headers=WRONG).status_code for _ in range(4)]
    assert statuses == [401, 401, 429, 429]


def test_without_redis_each_worker_counts_alone(make_app):
    """No REDIS_URL: the limits still hold, counted in the worker's memory."""
    client = limited(make_app, predict="2/minute").test_client()
    assert [client.post("/predict", json=BODY, headers=basic_auth()).status_code for _ in range(3)] == [200, 200, 429]


def test_limits_off_count_nothing(make_app, redis_url, redis_server):
    """RATE_LIMIT_*=off: no limit and no Redis call for it."""
    client = limited(make_app, redis_url, predict="off", login_failures="off").test_client()
    assert {client.post("/predict", json=BODY, headers=basic_auth()).status_code for _ in range(20)} == {200}
    assert not redis_server.client().keys("sibyl:limit:*")


@pytest.mark.parametrize(("hops", "seen"), [(0, "127.0.0.1"), (1, "203.0.113.9")])
def test_client_address_behind_trusted_proxies(make_app, redis_url, capsys, hops, seen):
    """TRUSTED_PROXY_HOPS=1 (the shipped nginx) takes the client's address from X-Forwarded-For; 0 ignores the
    header, so a client without a proxy in front cannot pick its own address to dodge the login limit."""
    app = make_app(REDIS_URL=redis_url, RATE_LIMIT_LOGIN_FAILURES="1/minute", TRUSTED_PROXY_HOPS=hops)
    client = app.test_client()
    spoof = {"X-Forwarded-For": "203.0.113.9"}
    client.post("/predict", json=BODY, headers={**WRONG, **spoof})
    line = [json.loads(x) for x in capsys.readouterr().out.splitlines() if '"message":"request"' in x][-1]
    assert line["remote_addr"] == seen
    other = {"X-Forwarded-For": "198.51.100.4"}  # another client, as the proxy reports it
    expected = 200 if hops else 429
    assert client.post("/predict", json=BODY, headers={**basic_auth(), **other}).status_code == expected


def test_limits_are_shared_across_gunicorn_workers(live_server, redis_url):
    """Two workers count one user in one Redis window: a request held on one worker uses up part of the limit the
    other enforces."""
    server = live_server(env={"REDIS_URL": redis_url, "RATE_LIMIT_PREDICT": "4/minute"}, workers=2)
    held = server.held_predict(BODY)  # counted on one worker, which then waits for the body's last byte
    statuses = [server.predict(BODY).status_code for _ in range(4)]  # all on the other worker
    status, _, _ = held.finish()
    assert (statuses, status) == ([200, 200, 200, 429], 200)
    lines = [json.loads(x) for x in server.stdout.read_text().splitlines() if '"message":"request"' in x]
    assert len({line["pid"] for line in lines if line["path"] == "/predict"}) == 2
    refused = server.predict(BODY)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1


def test_live_redis_outage_keeps_predictions_answered(live_server, own_redis):
    """Under gunicorn, Redis killed: predictions keep coming back 200, with no 5xx, past a limit they would hit (for a
    user not yet counted past it: one who was stays refused, as test_redis_outage_... shows in process)."""
    redis = own_redis()
    env = {"REDIS_URL": redis.url, "RATE_LIMIT_PREDICT": "2/minute", "RATE_LIMIT_ADMIN": "2/minute"}
    server = live_server(env=env, workers=2)
    assert [server.predict(BODY).status_code for _ in range(3)] == [200, 200, 429]
    redis.stop()
    admin = basic_auth(ADMIN, ADMIN_KEY)
    statuses = {
        requests.post(server.url + "/predict", json=BODY, headers=admin, timeout=10).status_code for _ in range(10)
    }
    assert statuses == {200}
    assert requests.get(server.url + "/health", timeout=10).status_code == 200


def test_allowed_requests_reach_redis_in_batches_and_none_is_lost(make_app, redis_url, redis_server):
    """Far from the limit, a worker sends its count at most every SYNC_SECONDS (plus a read of the address's refused
    logins), not once a request; after the next sync Redis holds every request."""
    client = limited(make_app, redis_url, predict="1000000/minute", login_failures="10/minute").test_client()
    redis = redis_server.client()
    evals = lambda: redis.info("commandstats").get("cmdstat_eval", {}).get("calls", 0)  # noqa: E731
    before, start = evals(), perf_counter()
    assert {client.post("/predict", json=BODY, headers=basic_auth()).status_code for _ in range(100)} == {200}
    sent, elapsed = evals() - before, perf_counter() - start
    assert sent <= 2 + elapsed / limits.SYNC_SECONDS, (sent, elapsed)
    time.sleep(limits.SYNC_SECONDS)
    client.post("/predict", json=BODY, headers=basic_auth())
    (key,) = redis.keys("sibyl:limit:user:*")
    assert int(redis.get(key)) == 101


def test_two_workers_near_the_limit_overshoot_it_by_little(make_app, redis_url):
    """Two workers (two apps on one Redis) taking turns: together they let through at most the limit plus an eighth
    of it, and the last requests before the limit are each counted in Redis first."""
    workers = [limited(make_app, redis_url, predict="400/minute").test_client() for _ in range(2)]
    statuses = [w.post("/predict", json=BODY, headers=basic_auth()).status_code for _ in range(300) for w in workers]
    allowed = statuses.count(200)
    assert 400 <= allowed <= 400 + 400 // limits.SHARE, allowed
    assert set(statuses[allowed + 2 :]) == {429}
