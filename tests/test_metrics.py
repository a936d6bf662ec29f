"""GET /metrics: requests, predictions and cache outcomes counted exactly, summed across live gunicorn workers and
across a worker's replacement; behind the admin or metrics role, or alone on METRICS_BIND without auth."""

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import ADMIN, ADMIN_KEY, IRIS_ROWS, ROOT, USERS, basic_auth, served_model
from prometheus_client.parser import text_string_to_metric_families

from app.cache import LOCAL_MAX_ROWS
from app.rollout import reload_registry
from tests.support.servers import free_port

SCRAPER, SCRAPER_KEY = "prom", "prom-test-key-0123456789abcdef"
WITH_SCRAPER = f"{USERS},{SCRAPER}:sha256:{hashlib.sha256(SCRAPER_KEY.encode()).hexdigest()}:metrics"
ADMIN_AUTH = basic_auth(ADMIN, ADMIN_KEY)
TINY_ROWS = [[0.5, -1.0], [2.0, 0.25]]
# The contract's latency buckets, as the text format writes them.
LE = ["0.0002", "0.0005", "0.001", "0.002", "0.005", "0.01", "0.02", "0.05", "0.1", "0.2", "0.5", "1.0", "2.0", "5.0"]


def parse(text: str) -> dict[tuple, float]:
    """A scrape as {(sample name, (label, value), ...): value}, labels sorted."""
    return {
        (s.name, *sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    """The sum of the samples of a name whose labels include these (other labels, e.g. model and version, summed
    over); 0 when no such series exists yet (a counter nobody incremented)."""
    wanted = set(labels.items())
    return sum(v for (sample, *pairs), v in samples.items() if sample == name and wanted <= set(pairs))


def series(samples: dict, name: str) -> list[dict]:
    """The label sets of every sample of a name."""
    return [dict(key[1:]) for key in samples if key[0] == name]


def requests_total(samples: dict, endpoint: str, status: str, method: str = "POST") -> float:
    """sibyl_requests_total for an endpoint, its blueprint as protocol."""
    protocol = endpoint.partition(".")[0] if endpoint != "unknown" else "none"
    return value(samples, "sibyl_requests_total", endpoint=endpoint, method=method, protocol=protocol, status=status)


def scrape(client, headers: dict | None = None) -> dict:
    """GET /metrics through the test client as the admin, parsed."""
    r = client.get("/metrics", headers=ADMIN_AUTH if headers is None else headers)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(r.text)


# --- one process (the Flask test client) ---


def test_requests_counted_by_endpoint_method_protocol_and_status(client):
    """Each answered request adds one to its (endpoint, method, protocol, status), routing failures included."""
    for _ in range(3):
        assert client.post("/predict", json={"features": IRIS_ROWS}, headers=basic_auth()).status_code == 200
    assert client.post("/predict", json={"features": [[1, 2]]}, headers=basic_auth()).status_code == 400
    assert client.post("/predict", json={"features": IRIS_ROWS}).status_code == 401
    assert client.post("/invocations", json={"inputs": IRIS_ROWS}, headers=basic_auth()).status_code == 200
    assert client.get("/no/such/path").status_code == 404
    assert client.open("/predict", method="BREW").status_code == 405
    samples = scrape(client)
    assert requests_total(samples, "native.predict", "200") == 3
    assert requests_total(samples, "native.predict", "400") == 1
    assert requests_total(samples, "native.predict", "401") == 1
    assert requests_total(samples, "mlflow.invocations", "200") == 1
    assert requests_total(samples, "unknown", "404", method="GET") == 1
    assert requests_total(samples, "unknown", "405", method="other") == 1  # a method token is not a label value
    # The scrape counts itself once it has answered: the next one sees it.
    assert requests_total(scrape(client), "metrics.metrics", "200", method="GET") == 1
    latency = value(samples, "sibyl_request_duration_seconds_count", endpoint="native.predict", protocol="native")
    assert latency == 5
    # The version that answered (or refused the body) labels its requests; a 401 reached no model.
    assert value(samples, "sibyl_requests_total", endpoint="native.predict", model="iris", version="1") == 4
    assert value(samples, "sibyl_requests_total", status="401", model="", version="") == 1
    native = series(samples, "sibyl_request_duration_seconds_bucket")
    buckets = [s["le"] for s in native if s["protocol"] == "native" and s["model"] == "iris"]
    assert buckets == [
        "0.0002",
        "0.0005",
        "0.001",
        "0.002",
        "0.005",
        "0.01",
        "0.02",
        "0.05",
        "0.1",
        "0.2",
        "0.5",
        "1.0",
        "2.0",
        "5.0",
        "+Inf",
    ]
    assert value(samples, "sibyl_rows_predicted_total", model="iris", version="1") == 3 * 2 + 2
    assert value(samples, "sibyl_in_flight_requests") == 1  # the scrape itself


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        (basic_auth(), 403),
        (basic_auth("alice", "wrong"), 401),
        (ADMIN_AUTH, 200),
        (basic_auth(SCRAPER, SCRAPER_KEY), 200),
        ({"Authorization": f"Bearer {SCRAPER_KEY}"}, 200),
    ],
)
def test_metrics_needs_the_admin_or_metrics_role(make_app, headers, status):
    """No or wrong credentials: 401; a predict-only key: 403 naming the roles; admin or metrics: 200. Errors in the
    one JSON shape."""
    r = make_app(SIBYL_USERS=WITH_SCRAPER).test_client().get("/metrics", headers=headers)
    assert r.status_code == status
    if status == 403:
        assert "needs the admin or metrics role" in r.json["error"]["message"]
    if status != 200:
        assert set(r.json["error"]) == {"code", "message", "request_id"}
    else:
        assert r.text.startswith("# HELP ")


def test_metrics_role_may_not_manage_models(make_app):
    """A scrape key reads /metrics and predicts, but the admin routes refuse it."""
    client = make_app(SIBYL_USERS=WITH_SCRAPER).test_client()
    assert client.get("/admin/users", headers=basic_auth(SCRAPER, SCRAPER_KEY)).status_code == 403


def test_create_user_role_metrics_makes_a_scrape_key(make_app, tmp_path):
    """`create-user --role metrics` writes an entry ending in :metrics whose key reads /metrics."""
    users = tmp_path / "users"
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "create-user", "scraper", "--role", "metrics", "--file", str(users)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert users.read_text().strip().endswith(":metrics")
    key = next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("key:"))
    client = make_app(SIBYL_USERS="", SIBYL_USERS_FILE=str(users)).test_client()
    assert client.get("/metrics", headers=basic_auth("scraper", key)).status_code == 200


def test_cache_outcomes_with_a_real_redis(make_app, redis_url):
    """miss, hit, partial and bypass as the pipeline answered them, per model; rows counted cached or not; the
    prediction histogram observes only requests that ran the backend."""
    client = make_app(REDIS_URL=redis_url, INFERENCE_BACKEND="sklearn").test_client()
    first, second = IRIS_ROWS
    sent = [
        ([first], {}, "MISS"),
        ([first], {}, "HIT"),
        ([first, second], {}, "PARTIAL"),
        ([first, second], {}, "HIT"),
        ([first], {"Cache-Control": "no-cache"}, "BYPASS"),
    ]
    for rows, headers, outcome in sent:
        r = client.post("/predict", json={"features": rows}, headers={**basic_auth(), **headers})
        assert r.headers["X-Cache"] == outcome
    samples = scrape(client)
    outcomes = series(samples, "sibyl_cache_requests_total")
    counts = {s["outcome"]: value(samples, "sibyl_cache_requests_total", **s) for s in outcomes}
    assert counts == {"miss": 1, "hit": 2, "partial": 1, "bypass": 1}
    assert value(samples, "sibyl_rows_predicted_total", model="iris", version="1") == 7
    # MISS, PARTIAL and BYPASS called the backend; the two HITs did not.
    labels = {"model": "iris", "version": "1", "backend": "sklearn"}
    assert value(samples, "sibyl_prediction_duration_seconds_count", **labels) == 3
    assert value(samples, "sibyl_prediction_duration_seconds_bucket", **labels, le="+Inf") == 3
    assert value(samples, "sibyl_cache_breaker_open") == 0


def test_a_batch_the_worker_tier_skips_counts_as_off_not_error(make_app, redis_url):
    """A model whose tiers are local (CACHE_POLICY=auto found Redis not worth it) predicts a batch larger than
    LOCAL_MAX_ROWS without the cache, by design: outcome off, never error, which an operator alerts on."""
    app = make_app(REDIS_URL=redis_url, INFERENCE_BACKEND="sklearn")
    served_model(app).cache_tiers = "local"
    client = app.test_client()
    batch = [[5.0 + i / 10, 3.0, 1.5, 0.2] for i in range(LOCAL_MAX_ROWS + 1)]
    r = client.post("/predict", json={"features": batch}, headers=basic_auth())
    assert r.status_code == 200 and r.headers["X-Cache"] == "OFF"
    samples = scrape(client)
    counts = {
        s["outcome"]: value(samples, "sibyl_cache_requests_total", **s)
        for s in series(samples, "sibyl_cache_requests_total")
    }
    assert counts == {"off": 1}


def test_redis_down_counts_error_and_opens_the_breaker(make_app):
    """A Redis that refuses connections: answers are uncached (X-Cache OFF), counted as outcome error, and the
    worker's breaker gauge reads 1; a cache switched off counts as off."""
    # No worker tier: a repeated row would be its hit.
    url = f"redis://127.0.0.1:{free_port()}/0"
    down = make_app(REDIS_URL=url, INFERENCE_BACKEND="sklearn", CACHE_LOCAL_ENTRIES=0).test_client()
    for _ in range(2):
        r = down.post("/predict", json={"features": IRIS_ROWS}, headers=basic_auth())
        assert r.status_code == 200 and r.headers["X-Cache"] == "OFF"
    samples = scrape(down)
    assert value(samples, "sibyl_cache_requests_total", model="iris", outcome="error") == 2
    assert value(samples, "sibyl_cache_breaker_open") == 1
    off = make_app().test_client()  # REDIS_URL empty
    off.post("/predict", json={"features": IRIS_ROWS}, headers=basic_auth())
    assert value(scrape(off), "sibyl_cache_requests_total", model="iris", outcome="off") == 1


def test_model_info_load_time_and_a_rollout(make_app, make_model_dir):
    """One info series per version served (sha256 prefix, backend, cache policy) and its load time; after a
    rollout, a retired version's info reads 0 and the new one's 1."""
    root = make_model_dir({"iris": ["1"], "tiny": ["9"]})
    app = make_app(MODEL_PATH="", MODEL_DIR=str(root), DEFAULT_MODEL="iris", INFERENCE_BACKEND="sklearn")
    registry = app.extensions["sibyl.registry"]
    info = {m.version: m.sha256[:12] for m in registry.loaded()}
    samples = scrape(app.test_client())
    for name, version in (("iris", "1"), ("tiny", "9")):
        labels = {"model": name, "version": version, "sha256": info[version], "backend": "sklearn"}
        assert value(samples, "sibyl_model_info", **labels, cache_policy="on") == 1
        assert value(samples, "sibyl_model_load_seconds", model=name, version=version) > 0
    (root / "tiny" / "9").rename(root / "tiny" / "10")
    meta = root / "tiny" / "10" / "model.json"
    meta.write_text(meta.read_text().replace('"version": "9"', '"version": "10"'))
    ok, why = reload_registry(app)
    assert ok, why
    samples = scrape(app.test_client())
    old = {"model": "tiny", "sha256": info["9"], "backend": "sklearn", "cache_policy": "on"}
    assert value(samples, "sibyl_model_info", **old, version="9") == 0
    assert value(samples, "sibyl_model_info", **old, version="10") == 1


def test_metrics_bind_takes_metrics_off_the_public_port(make_app):
    """With METRICS_BIND set, the app outside gunicorn has no metrics listener: /metrics is a JSON 404 there, for
    the admin too, and it leaves the OpenAPI document; the other routes are unchanged."""
    app = make_app(METRICS_BIND="127.0.0.1:9100")
    client = app.test_client()
    r = client.get("/metrics", headers=ADMIN_AUTH)
    assert r.status_code == 404 and set(r.json["error"]) == {"code", "message", "request_id"}
    assert client.post("/predict", json={"features": IRIS_ROWS}, headers=basic_auth()).status_code == 200
    assert "/metrics" not in client.get("/openapi.json").json["paths"]


# --- live: gunicorn with 2 workers and a real Redis ---


def live_scrape(server, headers: dict | None = None) -> dict:
    """GET /metrics from a live server as the admin, parsed."""
    r = requests.get(server.url + "/metrics", headers=ADMIN_AUTH if headers is None else headers, timeout=10)
    assert r.status_code == 200, r.text
    return parse(r.text)


def send_traffic(server, salt: float) -> dict[tuple, int]:
    """Known traffic for iris and tiny: per model 3 misses, 2 hits, a 400, and one 404 for an unknown model; the
    counts it should add, keyed as the assertions read them. salt makes the rows new to the cache."""
    expect: dict[tuple, int] = {}

    def add(key: tuple, n: int = 1) -> None:
        expect[key] = expect.get(key, 0) + n

    auth = basic_auth()
    for name, rows in (("iris", IRIS_ROWS[:1]), ("tiny", TINY_ROWS[:1])):
        url = f"{server.url}/models/{name}/predict"
        for i in range(3):
            fresh = [[x + salt + i for x in rows[0]]]
            r = requests.post(url, json={"features": fresh}, headers=auth, timeout=10)
            assert r.status_code == 200 and r.headers["X-Cache"] == "MISS", r.text
        for _ in range(2):
            again = [[x + salt for x in rows[0]]]
            r = requests.post(url, json={"features": again}, headers=auth, timeout=10)
            assert r.status_code == 200 and r.headers["X-Cache"] == "HIT", r.text
        assert requests.post(url, json={"features": [[1.0] * 7]}, headers=auth, timeout=10).status_code == 400
        add(("requests", "native.predict_model", "200"), 5)
        add(("requests", "native.predict_model", "400"))
        add(("cache", name, "miss"), 3)
        add(("cache", name, "hit"), 2)
        add(("rows", name), 5)
        add(("predict", name), 3)
    r = requests.post(f"{server.url}/models/nope/predict", json={"features": [[1.0]]}, headers=auth, timeout=10)
    assert r.status_code == 404
    add(("requests", "native.predict_model", "404"))
    return expect


def check_counts(samples: dict, expect: dict[tuple, int], versions: dict[str, str]) -> None:
    """Every expected count equals the scrape's."""
    for key, n in expect.items():
        if key[0] == "requests":
            assert requests_total(samples, key[1], key[2]) == n, key
        elif key[0] == "cache":
            assert value(samples, "sibyl_cache_requests_total", model=key[1], outcome=key[2]) == n, key
        elif key[0] == "rows":
            assert value(samples, "sibyl_rows_predicted_total", model=key[1], version=versions[key[1]]) == n, key
        else:
            found = [
                value(samples, "sibyl_prediction_duration_seconds_count", **s)
                for s in series(samples, "sibyl_prediction_duration_seconds_count")
                if s["model"] == key[1]
            ]
            assert found == [n], key


def merge(*counts: dict[tuple, int]) -> dict[tuple, int]:
    """Counts added key by key."""
    total: dict[tuple, int] = {}
    for c in counts:
        for key, n in c.items():
            total[key] = total.get(key, 0) + n
    return total


def exited_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def answered_by(server, offset: int) -> set[int]:
    """The worker pids that wrote request lines since a byte offset of the server's stdout."""
    return {line["pid"] for line in server.request_lines(offset)}


# SIGKILL: a crashed worker. SIGTERM: a worker leaving on its own, as max_requests recycling makes it.
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "recycled"])
def test_live_counts_add_up_across_workers_and_a_replaced_worker(live_server, redis_url, make_model_dir, sig):
    """Two workers each serve part of known traffic; the scrape's counts are exactly what was sent. After one
    worker exits and is replaced, nothing is lost, the exit is counted, the dead pid's live gauges are gone, and
    new traffic adds on."""
    root = make_model_dir({"iris": ["1"], "tiny": ["9"]})
    env = {"MODEL_PATH": "", "MODEL_DIR": str(root), "DEFAULT_MODEL": "iris", "REDIS_URL": redis_url}
    env["INFERENCE_BACKEND"] = "sklearn"  # no ONNX compile at startup: the test is about counting
    # A folder a killed master left behind (its pid no longer exists): the next master removes it.
    stale = Path("/dev/shm") / f"sibyl-metrics-{exited_pid()}-left"
    stale.mkdir()
    server = live_server(env=env, workers=2)
    master = server.proc.pid
    folders = list(Path("/dev/shm").glob(f"sibyl-metrics-{master}-*"))
    assert len(folders) == 1 and stat.S_IMODE(folders[0].stat().st_mode) == 0o700
    assert not stale.exists()
    versions = {"iris": "1", "tiny": "9"}

    # A held request pins one worker, so the first batch goes to the other; then the roles swap.
    offset = server.stdout.stat().st_size
    held = server.held_predict({"features": IRIS_ROWS})
    first = send_traffic(server, salt=10.0)
    other = server.held_predict({"features": IRIS_ROWS})  # now both are held ...
    status, headers, _ = held.finish()  # ... and the first is freed to serve the second batch alone
    assert (status, headers["X-Cache"]) == (200, "MISS")
    second = send_traffic(server, salt=20.0)
    status, headers, _ = other.finish()
    assert (status, headers["X-Cache"]) == (200, "HIT")
    workers = server.workers()
    assert answered_by(server, offset) == set(workers)  # both workers answered
    # The two held requests (POST /predict, the default model): the same two rows, a miss, then a hit from Redis.
    held_counts = {("requests", "native.predict", "200"): 2, ("rows", "iris"): 4, ("predict", "iris"): 1}
    expect = merge(first, second, held_counts, {("cache", "iris", "miss"): 1, ("cache", "iris", "hit"): 1})

    before = live_scrape(server)
    check_counts(before, expect, versions)
    assert value(before, "sibyl_worker_exits_total") == 0
    assert value(before, "sibyl_in_flight_requests") == 1  # the scrape itself, on one worker
    assert value(before, "sibyl_cache_breaker_open") == 0
    rss = {s["pid"] for s in series(before, "sibyl_process_resident_memory_bytes")}
    assert rss == {str(pid) for pid in [master, *workers]}
    assert all(value(before, "sibyl_process_resident_memory_bytes", pid=pid) > 0 for pid in rss)

    victim = workers[0]
    os.kill(victim, sig)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (victim in server.workers() or len(server.workers()) != 2):
        time.sleep(0.1)
    assert victim not in server.workers() and len(server.workers()) == 2
    after = live_scrape(server)
    check_counts(after, expect, versions)
    assert requests_total(after, "metrics.metrics", "200", method="GET") == 1  # the scrape before
    assert value(after, "sibyl_worker_exits_total") == 1
    assert str(victim) not in {s["pid"] for s in series(after, "sibyl_process_resident_memory_bytes")}
    assert value(after, "sibyl_in_flight_requests") == 1

    third = send_traffic(server, salt=30.0)
    check_counts(live_scrape(server), merge(expect, third), versions)

    server.stop()
    assert not folders[0].exists()  # the master removed its folder on the way out


def test_live_metrics_bind_serves_metrics_alone_without_auth(live_server):
    """METRICS_BIND: /metrics answers there without credentials (and nothing else does); the public port answers
    404 for it, whoever asks."""
    port = free_port()
    server = live_server(env={"METRICS_BIND": f"127.0.0.1:{port}"}, workers=2)
    private = f"http://127.0.0.1:{port}"
    assert requests.post(server.url + "/predict", json={"features": IRIS_ROWS}, headers=basic_auth()).ok
    r = requests.get(private + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    assert requests_total(parse(r.text), "native.predict", "200") == 1
    # A Host header naming the private port changes nothing: the listener is told by the socket.
    for headers in ({}, ADMIN_AUTH, {**ADMIN_AUTH, "Host": f"127.0.0.1:{port}"}):
        public = requests.get(server.url + "/metrics", headers=headers, timeout=10)
        assert public.status_code == 404 and public.json()["error"]["code"] == "not_found"
    for path in ("/predict", "/health", "/openapi.json"):
        assert requests.get(private + path, headers=ADMIN_AUTH, timeout=10).status_code == 404


def test_bench_measures_the_recording_calls_as_a_predict_request_makes_them(iris_path):
    """make bench's recording probe (bench/recording.py) runs the metrics calls of a predict request, labels and all,
    and reports each one's cost; it broke once when the request metrics took model labels, and only make bench knew."""
    args = [sys.executable, "-m", "bench.recording", str(iris_path), "auto"]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(figures) == {"request_us", "prediction_us", "drift_1_row_us"}
    assert all(v > 0 for v in figures.values())


def test_scrape_reads_around_a_worker_file_deleted_mid_scrape(app, tmp_path, monkeypatch):
    """A worker's metric file listed by a scrape and deleted before it is read (the worker exited: a rollout, a
    max_requests recycle; the soak met it as a 500 at GET /metrics) is left out, not an error."""
    from prometheus_client import multiprocess

    listed, real = [], multiprocess.glob.glob

    def listing(pattern: str) -> list[str]:
        """The folder's files, plus, the first time, one that is already gone."""
        listed.append(pattern)
        return real(pattern) + ([str(tmp_path / "gauge_max_999999.db")] if len(listed) == 1 else [])

    monkeypatch.setattr(multiprocess.glob, "glob", listing)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert app.extensions["sibyl.metrics"].families() == []
    assert len(listed) == 2


_FORKED_WRITES = """
import os, sys
from app import metrics  # first: it hands prometheus_client app.process's id before any metric exists
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.multiprocess import MultiProcessCollector

counter = Counter("forked", "counts from two processes", ["who"], registry=None)
counter.labels("parent").inc()
child = os.fork()
if child == 0:
    counter.labels("child").inc(2)
    counter.labels("parent").inc(3)  # the parent's series, written from the child: the child's own file
    os._exit(0)
os.waitpid(child, 0)
counter.labels("parent").inc()
files = sorted(os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
registry = CollectorRegistry()
MultiProcessCollector(registry)
totals = {s.labels["who"]: s.value for f in registry.collect() for s in f.samples if s.name == "forked_total"}
print(files == sorted([f"counter_{os.getpid()}.db", f"counter_{child}.db"]), totals)
"""


def test_a_forked_worker_writes_its_own_metric_file(tmp_path):
    """Multiprocess mode keeps each process's counts in a file named after it (app.process reads the id once per
    process and again after a fork, not at every write): a forked worker writes its own file, and the scrape adds
    both up."""
    out = subprocess.run(
        [sys.executable, "-c", _FORKED_WRITES],
        cwd=ROOT,
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == "True {'parent': 5.0, 'child': 2.0}"
