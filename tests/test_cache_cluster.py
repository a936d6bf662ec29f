"""The prediction cache on a real Redis Cluster (REDIS_CLUSTER=true; three masters on loopback): a batch whose rows
live on every master, TTLs, /ready and feedback; a master killed (served uncached, never a 5xx, cached again once it
is back) or hung (one timeout, not one per row); gunicorn workers sharing the cluster."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis
import requests
from conftest import IRIS_ROWS, basic_auth
from test_cache import Service, cache_header
from test_cache_live import served_by

from app.errors import StartupError
from app.registry import MISS_ROUND_TRIPS
from tests.support.servers import await_redis, free_port, json_lines, redis_args, spawn, stop

# 60 distinct rows: their keys fall in about 60 slots, spread over the three masters.
ROWS = [[round(4.3 + i * 0.06, 2), 2.0 + (i % 12) / 5, 1.0 + (i % 30) / 5, 0.1 + (i % 24) / 10] for i in range(60)]


class Cluster:
    """Three redis-server masters in cluster mode on loopback, joined by `redis-cli --cluster create`. No replicas:
    a dead master's slots are served by nobody until it returns."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ports = [free_port() for _ in range(3)]
        # Each master's cluster bus port, given: the default (port + 10000) may be past 65535 or taken.
        self.bus = {port: free_port() for port in self.ports}
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        """REDIS_URL: the first master; the client learns the others from it."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def node(self, port: int) -> redis.Redis:
        """A plain client on one master, to see what that master holds."""
        return redis.Redis(port=port, socket_timeout=2)

    def start_node(self, port: int) -> None:
        """Start one master (again: its nodes file keeps its id and slots; no persistence, so no keys) until PING."""
        conf = str(self.workdir / f"nodes-{port}.conf")
        cluster = ("--cluster-enabled", "yes", "--cluster-config-file", conf, "--cluster-port", str(self.bus[port]))
        args = redis_args(self.workdir, "--port", str(port), *cluster)
        log = self.workdir / f"redis-{port}.log"
        self.procs[port] = spawn(args, stdout=log, stderr=log)
        await_redis(self.procs[port], self.node(port), timeout=10)

    def start(self) -> "Cluster":
        """Start the masters, give them the 16384 slots, and wait until the cluster is ok."""
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.fail("redis-cli is not on PATH (Debian's redis-tools, which `make test` installs with redis-server)")
        for port in self.ports:
            self.start_node(port)
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        create = [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"]
        subprocess.run(create, check=True, capture_output=True, timeout=30)
        return self.await_ok()

    def await_ok(self, timeout: float = 20) -> "Cluster":
        """Wait until every master says cluster_state:ok (all slots served, every master reachable)."""
        deadline = time.monotonic() + timeout
        while not all(b"cluster_state:ok" in self.node(p).execute_command("CLUSTER", "INFO") for p in self.ports):
            assert time.monotonic() < deadline, "the cluster did not reach cluster_state:ok"
            time.sleep(0.1)
        return self

    def keys_by_node(self) -> dict[int, list[bytes]]:
        """Each master's keys."""
        return {port: sorted(self.node(port).keys("*")) for port in self.ports}

    def stop(self) -> None:
        """Stop every master."""
        for proc in self.procs.values():
            stop(proc)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One three-master cluster for the module; tests that kill a master leave it to `cluster_url` to restart."""
    running = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield running.start()
    finally:
        running.stop()


@pytest.fixture
def cluster_url(cluster) -> str:
    """The cluster's URL, every master up (restarted if a test killed it) and emptied."""
    for port, proc in cluster.procs.items():
        if proc.poll() is not None:
            cluster.start_node(port)
    cluster.await_ok()
    for port in cluster.ports:
        cluster.node(port).flushall()
    return cluster.url


@pytest.fixture
def make_cluster_service(make_app, cluster_url):
    """Factory: the iris app on the cluster, its model calls counted, without the worker-local tier (so every HIT
    came from Redis) and with a generous timeout unless given."""

    def make(**overrides) -> Service:
        config = {"REDIS_URL": cluster_url, "REDIS_CLUSTER": True, "CACHE_TIMEOUT_MS": 1000, "CACHE_LOCAL_ENTRIES": 0}
        return Service(make_app(**{**config, **overrides}))

    return make


def ready(svc: Service) -> dict:
    """GET /ready's body (200 whatever the cache's state)."""
    resp = svc.client.get("/ready")
    assert resp.status_code == 200
    return resp.json


def test_batch_across_masters_is_a_miss_then_a_hit(make_cluster_service, cluster):
    """A batch's rows are stored on all three masters with CACHE_TTL before the answer leaves; the same batch is then
    a HIT for every row, on this worker and on another, and the model was asked once."""
    svc, other = make_cluster_service(CACHE_TTL=600), make_cluster_service()
    first = svc.predict(ROWS, proba=True)
    assert (first.status_code, *cache_header(first)) == (200, "MISS", "0")
    held = cluster.keys_by_node()
    assert sum(map(len, held.values())) == len(ROWS)
    assert all(held.values()), "every master holds some of the rows"
    ttls = [cluster.node(port).ttl(key) for port, keys in held.items() for key in keys]
    assert all(0 < ttl <= 600 for ttl in ttls)
    again, elsewhere = svc.predict(ROWS, proba=True), other.predict(ROWS, proba=True)
    assert cache_header(again) == cache_header(elsewhere) == ("HIT", str(len(ROWS)))
    assert again.data == elsewhere.data == first.data
    assert len(svc.backend.calls) == 1
    assert not other.backend.calls
    assert ready(svc) == {"status": "ready", "model": "ok", "cache": "ok"}  # every master answered PING


def test_partial_batch_predicts_only_missing_rows(make_cluster_service):
    """Rows cached on any master are hits; one model call gets exactly the others, in request order."""
    svc = make_cluster_service()
    svc.predict(ROWS[:40:2])  # every other row of the first 40
    svc.backend.calls.clear()
    resp = svc.predict(ROWS[:40])
    assert (resp.status_code, *cache_header(resp)) == (200, "PARTIAL", "20")
    (asked,) = svc.backend.calls
    assert asked.tolist() == ROWS[1:40:2]
    assert cache_header(svc.predict([ROWS[1]])) == ("HIT", "1")  # one row: one command on one master


def test_killed_master_serves_uncached_then_caches_again(make_cluster_service, cluster, capsys):
    """SIGKILL one master: answers stay 200 and correct, uncached (X-Cache OFF) and quick while the breaker is
    open, /ready says degraded; once the master is back (empty: no persistence) the rows the others hold are hits
    again and the rest are stored anew. The outage and the recovery are logged once each."""
    svc = make_cluster_service(CACHE_RETRY_SECONDS=0.5, CACHE_TIMEOUT_MS=200)
    first = svc.predict(ROWS)
    victim = cluster.ports[1]
    lost = len(cluster.keys_by_node()[victim])
    stop(cluster.procs[victim], signal.SIGKILL)

    for rows in (ROWS, ROWS[:1], ROWS, ROWS[5:9]):
        start = time.monotonic()
        resp = svc.predict(rows)
        assert (resp.status_code, resp.headers["X-Cache"]) == (200, "OFF")
        assert time.monotonic() - start < 2
        assert resp.json["predictions"] == first.json["predictions"][ROWS.index(rows[0]) :][: len(rows)]
    assert ready(svc) == {"status": "degraded", "model": "ok", "cache": "down", "cache_reason": "down"}

    cluster.start_node(victim)
    cluster.await_ok()
    deadline = time.monotonic() + 10
    while (resp := svc.predict(ROWS)).headers["X-Cache"] == "OFF":  # the breaker probes again after 0.5 s
        assert time.monotonic() < deadline, "caching did not resume"
        time.sleep(0.1)
    assert (resp.status_code, *cache_header(resp)) == (200, "PARTIAL", str(len(ROWS) - lost))
    assert cache_header(svc.predict(ROWS)) == ("HIT", str(len(ROWS)))
    assert ready(svc)["status"] == "ready"
    messages = [line["message"] for line in json_lines(capsys.readouterr().out)]
    assert sum(m.startswith("cache down") for m in messages) == 1
    assert sum(m.startswith("cache back up") for m in messages) == 1


def test_hung_master_costs_one_timeout_not_one_per_row(make_cluster_service, cluster):
    """A master that stops answering (SIGSTOP) costs a batch one CACHE_TIMEOUT_MS, then the breaker: redis-py's own
    cluster pipeline would resend each of its rows alone, one timeout each (about 20 rows here)."""
    svc = make_cluster_service(CACHE_TIMEOUT_MS=100, CACHE_RETRY_SECONDS=30)
    first = svc.predict(ROWS)  # connections to every master are open
    victim = cluster.procs[cluster.ports[2]]
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        resp = svc.predict(ROWS)
        took = time.monotonic() - start
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    assert (resp.status_code, resp.headers["X-Cache"]) == (200, "OFF")
    assert resp.data == first.data
    assert took < 1, f"a hung master cost {took:.2f} s"


def test_feedback_joins_across_slots(make_app, cluster_url):
    """POST /feedback works on a cluster, where a request's predictions, its tombstone and the version's window are in
    three slots: joined once (200), then 409; an unknown id is a 404."""
    client = make_app(REDIS_URL=cluster_url, REDIS_CLUSTER=True, FEEDBACK_TTL=60).test_client()
    predicted = client.post("/predict", json={"features": ROWS[:3]}, headers=basic_auth())
    assert predicted.status_code == 200
    request_id, answers = predicted.headers["X-Request-ID"], predicted.json["predictions"]

    def post(request_id: str):
        truth = {"request_id": request_id, "truth": [answers[0], None, answers[2]]}
        return client.post("/feedback", json=truth, headers=basic_auth())

    joined = post(request_id)
    assert joined.status_code == 200, joined.json
    assert joined.json["window"] == {"rows": 2, "accuracy": 1.0}
    assert post(request_id).status_code == 409
    assert post("never-answered-here").status_code == 404


def test_auto_policy_weighs_one_masters_round_trip(make_cluster_service):
    """CACHE_POLICY=auto measures a cluster's round trip as one node's PING (a batch's commands go to the masters
    side by side), and decides as on one server."""
    svc = make_cluster_service(CACHE_POLICY="auto")
    figures = svc.model.cache_figures
    assert 0 < figures["redis_round_trip_us"] < 100_000
    assert svc.model.cache_tiers == (
        "redis" if figures["row_us"] > MISS_ROUND_TRIPS * figures["redis_round_trip_us"] else "local"
    )


def test_acl_user_needs_only_the_documented_commands(make_cluster_service, cluster):
    """An ACL user with exactly the commands the README lists for a cluster (its layout: CLUSTER SLOTS and COMMAND,
    read when the client is made; a GET and a SET per row; PING for /ready) gets a MISS, then a HIT, and /ready ok;
    with the ones it lists for feedback, POST /feedback joins. ACL users are per node: each master gets its own."""
    perms = ["~sibyl:*", "+get", "+set", "+ping", "+command", "+cluster|slots"]
    feedback = ["+mget", "+del", "+eval", "+lpush", "+ltrim", "+lrange"]  # and these for POST /feedback
    for port in cluster.ports:
        cluster.node(port).execute_command("ACL", "SETUSER", "sibyl", "reset", "on", ">acl-pw-c1u5", *perms)
    try:
        url = cluster.url.replace("redis://", "redis://sibyl:acl-pw-c1u5@")
        svc = make_cluster_service(REDIS_URL=url)
        assert cache_header(svc.predict(ROWS)) == ("MISS", "0")
        assert cache_header(svc.predict(ROWS)) == ("HIT", str(len(ROWS)))
        assert ready(svc)["cache"] == "ok"
        for port in cluster.ports:
            cluster.node(port).execute_command("ACL", "SETUSER", "sibyl", *feedback)
        svc = make_cluster_service(REDIS_URL=url, FEEDBACK_TTL=60)
        predicted = svc.predict(ROWS[:2])
        truth = {"request_id": predicted.headers["X-Request-ID"], "truth": predicted.json["predictions"]}
        assert svc.client.post("/feedback", json=truth, headers=basic_auth()).status_code == 200
    finally:
        for port in cluster.ports:
            cluster.node(port).execute_command("ACL", "DELUSER", "sibyl")


def test_plain_client_on_a_cluster_node_fails_open_and_says_why(make_app, cluster_url, capsys):
    """REDIS_URL naming a cluster node without REDIS_CLUSTER: answers are served uncached, never a 5xx, and the
    log line says which setting is missing."""
    client = make_app(REDIS_URL=cluster_url, CACHE_LOCAL_ENTRIES=0).test_client()
    resp = client.post("/predict", json={"features": ROWS}, headers=basic_auth())
    assert (resp.status_code, resp.headers["X-Cache"]) == (200, "OFF")
    assert "set REDIS_CLUSTER=true" in capsys.readouterr().out


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/1", "redis://127.0.0.1:6379?db=2", "unix:///tmp/redis.sock"])
def test_cluster_needs_a_host_and_database_0(make_app, url):
    """A cluster has one database and no unix sockets: such a REDIS_URL with REDIS_CLUSTER stops startup in one line
    that never quotes the URL."""
    with pytest.raises(StartupError) as e:
        make_app(REDIS_URL=url, REDIS_CLUSTER="true")
    assert str(e.value) == "REDIS_URL must be a redis:// or rediss:// URL of database 0 with REDIS_CLUSTER=true"


def test_answered_rows_are_hits_on_the_other_gunicorn_worker(live_server, cluster_url):
    """Under gunicorn with REDIS_CLUSTER=true, a batch one worker answered is in the cluster before its response
    leaves: the other worker's request for it, held until then, is a HIT for every row."""
    env = {"REDIS_URL": cluster_url, "REDIS_CLUSTER": "true", "CACHE_TIMEOUT_MS": "1000", "CACHE_LOCAL_ENTRIES": "0"}
    server = live_server(env=env, workers=2)
    body = {"features": ROWS[:30]}
    held = server.held_predict(body, headers={"X-Request-ID": "held"})
    answered = server.predict(body, headers={"X-Request-ID": "answered"})
    assert (answered.status_code, answered.headers["X-Cache"]) == (200, "MISS")
    status, headers, content = held.finish()
    assert (status, headers["X-Cache"], headers["X-Cache-Hits"]) == (200, "HIT", "30")
    assert content == answered.content
    assert served_by(server, "held")["pid"] != served_by(server, "answered")["pid"]
    assert requests.get(server.url + "/ready", timeout=5).json()["cache"] == "ok"


def test_limits_count_on_a_cluster(make_app, cluster_url, cluster):
    """Rate limits on a cluster: the user's and the address's counters (each on its own slot's master) hold."""
    app = make_app(REDIS_URL=cluster_url, REDIS_CLUSTER=True, RATE_LIMIT_PREDICT="2/minute",
                   RATE_LIMIT_LOGIN_FAILURES="1/minute")  # fmt: skip
    client = app.test_client()
    body = {"features": IRIS_ROWS[:1]}
    assert [client.post("/predict", json=body, headers=basic_auth()).status_code for _ in range(3)] == [200, 200, 429]
    wrong = basic_auth(key="wrong")
    assert [client.post("/predict", json=body, headers=wrong).status_code for _ in range(2)] == [401, 429]
    keys = [key for keys in cluster.keys_by_node().values() for key in keys if key.startswith(b"sibyl:limit:")]
    assert len(keys) == 2
