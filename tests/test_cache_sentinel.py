"""The prediction cache on a Sentinel-managed Redis (REDIS_URL=redis+sentinel://...; a primary, a replica and a
Sentinel on loopback): a miss then a hit on the primary, feedback, gunicorn workers; bad URLs stop startup in one line;
a primary killed or failed over is served uncached (never a 5xx) until the Sentinel names the new one, then cached
again with no restart; a stale Sentinel naming a replica (READONLY) is an outage, not a read-only cache."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import requests
from conftest import ROOT, basic_auth
from test_cache import cache_header
from test_cache_live import served_by

import config
from app.errors import StartupError
from tests.support.servers import await_redis, free_port, json_lines, redis_args, redis_binary, spawn, stop

PASSWORD = "data-pw-5e7t"  # the primary's and the replica's; the Sentinels ask for none unless a test sets one
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]


class Sentinels:
    """A primary, its replica and one Sentinel watching them as "m" (quorum 1: it alone decides a failover, half a
    second after the primary stops answering), on loopback."""

    def __init__(self, workdir: Path, down_after_ms: int = 500) -> None:
        self.workdir = workdir
        self.ports = [free_port(), free_port()]  # the first starts as the primary
        self.sentinel_port = free_port()
        self.down_after_ms = down_after_ms
        self.procs: dict[int, subprocess.Popen] = {}

    def url(self, db: int = 0, query: str = "") -> str:
        """REDIS_URL: the data servers' password, the Sentinel, the primary's name and a database."""
        return f"redis+sentinel://:{PASSWORD}@127.0.0.1:{self.sentinel_port}/m/{db}{query}"

    def server(self, port: int, db: int = 0) -> redis.Redis:
        """A plain client on one data server's database."""
        return redis.Redis(port=port, db=db, password=PASSWORD, socket_timeout=2)

    @property
    def sentinel(self) -> redis.Redis:
        """A client on the Sentinel."""
        return redis.Redis(port=self.sentinel_port, socket_timeout=2)

    def primary(self) -> int:
        """The port the Sentinel names as the primary now."""
        return int(self.sentinel.sentinel_get_master_addr_by_name("m")[1])

    def start_server(self, port: int, *extra: str) -> None:
        """Start one data server (with `--replicaof host port` for a replica) until it answers PING."""
        auth = ("--requirepass", PASSWORD, "--masterauth", PASSWORD)
        # A replica syncs at once (Redis waits 5 s by default, in case more replicas come to share the transfer).
        sync = ("--repl-diskless-sync-delay", "0")
        log = self.workdir / f"redis-{port}.log"
        self.procs[port] = spawn(
            redis_args(self.workdir, "--port", str(port), *auth, *sync, *extra), stdout=log, stderr=log
        )
        await_redis(self.procs[port], self.server(port), timeout=10)

    def start(self) -> "Sentinels":
        """Start the primary, the replica and the Sentinel (its config file is its own: Sentinel rewrites it), and
        wait until the Sentinel sees both servers up and the replica in sync."""
        primary, replica = self.ports
        self.start_server(primary)
        self.start_server(replica, "--replicaof", "127.0.0.1", str(primary))
        conf = self.workdir / f"sentinel-{self.sentinel_port}.conf"
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.workdir}\n"
            f"sentinel monitor m 127.0.0.1 {primary} 1\n"
            f"sentinel auth-pass m {PASSWORD}\n"
            f"sentinel down-after-milliseconds m {self.down_after_ms}\n"
            "sentinel failover-timeout m 2000\n"
        )
        log = self.workdir / f"sentinel-{self.sentinel_port}.log"
        self.procs[self.sentinel_port] = spawn([redis_binary(), str(conf), "--sentinel"], stdout=log, stderr=log)
        await_redis(self.procs[self.sentinel_port], self.sentinel, timeout=10)
        return self.await_healthy()

    def await_healthy(self, timeout: float = 20) -> "Sentinels":
        """Wait until the Sentinel names a primary it sees up, with a replica it sees up and in sync."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.sentinel.sentinel_master("m")
            replicas = self.sentinel.sentinel_slaves("m")
            linked = [r for r in replicas if not r["is_sdown"] and r.get("master-link-status") == "ok"]
            if not (state["is_sdown"] or state["is_odown"]) and linked:
                return self
            assert time.monotonic() < deadline, f"the Sentinel did not see a healthy pair: {state}, {replicas}"
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop every process this started."""
        for proc in self.procs.values():
            stop(proc)


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory):
    """One primary, replica and Sentinel for the module's tests that leave them as they found them."""
    running = Sentinels(tmp_path_factory.mktemp("sentinel"))
    try:
        yield running.start()
    finally:
        running.stop()


@pytest.fixture
def sentinel_url(sentinels) -> str:
    """The module's REDIS_URL, its primary emptied (and so its replica)."""
    sentinels.server(sentinels.primary()).flushall()
    return sentinels.url()


@pytest.fixture
def own_sentinels(tmp_path):
    """A primary, replica and Sentinel for one test, to kill or fail over."""
    running = Sentinels(tmp_path)
    try:
        yield running.start()
    finally:
        running.stop()


def predict(client, rows: list) -> object:
    """POST /predict through the Flask test client, as the test user."""
    return client.post("/predict", json={"features": rows}, headers=basic_auth())


def ready(client) -> dict:
    """GET /ready's body (200 whatever the cache's state)."""
    resp = client.get("/ready")
    assert resp.status_code == 200
    return resp.json


def settings(url: str, **overrides) -> dict:
    """Cache settings for these tests: no worker-local tier (so every HIT came from Redis), a short back-off."""
    return {"REDIS_URL": url, "CACHE_LOCAL_ENTRIES": 0, "CACHE_RETRY_SECONDS": 0.5, **overrides}


def test_row_is_a_miss_then_a_hit_on_the_primary(make_app, sentinels, sentinel_url, capsys):
    """Through the Sentinel, a batch is a MISS stored on the primary (in the URL's database, replicated to the
    replica), then a HIT; /ready is ok. The data servers' password never reaches the log."""
    client = make_app(**settings(sentinels.url(db=3))).test_client()
    first = predict(client, ROWS)
    assert (first.status_code, *cache_header(first)) == (200, "MISS", "0")
    again = predict(client, ROWS)
    assert (again.status_code, *cache_header(again)) == (200, "HIT", str(len(ROWS)))
    assert again.data == first.data
    primary, replica = sentinels.ports
    assert sentinels.primary() == primary
    assert len(sentinels.server(primary, db=3).keys("*")) == len(ROWS)
    await_keys(sentinels.server(replica, db=3), len(ROWS))
    assert ready(client) == {"status": "ready", "model": "ok", "cache": "ok"}
    assert PASSWORD not in capsys.readouterr().out


def test_answered_rows_are_hits_on_the_other_gunicorn_worker(live_server, sentinel_url):
    """Under gunicorn, each worker makes its own Sentinel client after the fork: a batch one worker answered is on
    the primary before its response leaves, and the other worker's request for it, held until then, is a HIT."""
    env = {"REDIS_URL": sentinel_url, "CACHE_TIMEOUT_MS": "1000", "CACHE_LOCAL_ENTRIES": "0"}
    server = live_server(env=env, workers=2)
    body = {"features": ROWS}
    held = server.held_predict(body, headers={"X-Request-ID": "held"})
    answered = server.predict(body, headers={"X-Request-ID": "answered"})
    assert (answered.status_code, answered.headers["X-Cache"]) == (200, "MISS")
    status, headers, content = held.finish()
    assert (status, headers["X-Cache"], headers["X-Cache-Hits"]) == (200, "HIT", str(len(ROWS)))
    assert content == answered.content
    assert served_by(server, "held")["pid"] != served_by(server, "answered")["pid"]
    assert requests.get(server.url + "/ready", timeout=5).json()["cache"] == "ok"


def test_feedback_joins_on_the_primary(make_app, sentinel_url):
    """POST /feedback keeps and joins predictions on the primary the Sentinel names: joined once (200), then 409."""
    client = make_app(**settings(sentinel_url, FEEDBACK_TTL=60)).test_client()
    predicted = predict(client, ROWS)
    truth = {"request_id": predicted.headers["X-Request-ID"], "truth": predicted.json["predictions"]}
    joined = client.post("/feedback", json=truth, headers=basic_auth())
    assert joined.status_code == 200, joined.json
    assert joined.json["window"] == {"rows": len(ROWS), "accuracy": 1.0}
    assert client.post("/feedback", json=truth, headers=basic_auth()).status_code == 409


def test_sentinels_with_a_password_take_sentinel_password(make_app, sentinels, sentinel_url):
    """The URL's password is the data servers'. Sentinels that demand one of their own get it from the
    sentinel_password query option; without it they can't be asked, and the cache is down (served uncached)."""
    sentinels.sentinel.execute_command("ACL", "SETUSER", "default", "resetpass", ">sentinel-pw-9q")
    try:
        without = make_app(**settings(sentinel_url)).test_client()
        assert (predict(without, ROWS).status_code, predict(without, ROWS).headers["X-Cache"]) == (200, "OFF")
        assert ready(without)["cache"] == "down"
        client = make_app(**settings(sentinels.url(query="?sentinel_password=sentinel-pw-9q"))).test_client()
        assert cache_header(predict(client, ROWS)) == ("MISS", "0")
        assert cache_header(predict(client, ROWS)) == ("HIT", str(len(ROWS)))
    finally:
        admin = redis.Redis(port=sentinels.sentinel_port, password="sentinel-pw-9q", socket_timeout=2)
        admin.execute_command("ACL", "SETUSER", "default", "nopass")


def test_killed_primary_is_served_uncached_until_the_replica_is_promoted(make_app, own_sentinels, capsys):
    """SIGKILL the primary: every request meanwhile is answered 200 (X-Cache OFF), quickly, and /ready says
    degraded; once the Sentinel has promoted the replica (about 1 s here), caching resumes by itself within a
    back-off, no restart: the rows stored before the kill (replicated) are HITs, a new row is stored on the new
    primary. The outage is logged once, the recovery once."""
    client = make_app(**settings(own_sentinels.url(), CACHE_TIMEOUT_MS=200)).test_client()
    assert cache_header(predict(client, ROWS[:2])) == ("MISS", "0")
    old, new = own_sentinels.ports
    await_keys(own_sentinels.server(new), 2)
    stop(own_sentinels.procs[old], signal.SIGKILL)
    killed = time.monotonic()
    assert ready(client) == {"status": "degraded", "model": "ok", "cache": "down", "cache_reason": "down"}
    seen = []
    while True:
        start = time.monotonic()
        resp = predict(client, ROWS[:2])
        assert resp.status_code == 200
        assert time.monotonic() - start < 1
        seen.append(resp.headers["X-Cache"])
        if seen[-1] == "HIT":
            break
        assert seen[-1] == "OFF"
        assert time.monotonic() - killed < 15, "caching did not resume"
        time.sleep(0.05)
    assert own_sentinels.primary() == new
    assert "OFF" in seen
    assert cache_header(predict(client, ROWS[2:])) == ("MISS", "0")
    assert cache_header(predict(client, ROWS[2:])) == ("HIT", "1")
    assert len(own_sentinels.server(new).keys("*")) == len(ROWS)
    assert ready(client) == {"status": "ready", "model": "ok", "cache": "ok"}
    messages = [line["message"] for line in json_lines(capsys.readouterr().out)]
    assert sum(m.startswith("cache down") for m in messages) == 1
    assert sum(m.startswith("cache back up") for m in messages) == 1


def test_forced_failover_moves_the_cache_to_the_new_primary(make_app, own_sentinels):
    """SENTINEL FAILOVER: the Sentinel names the replica within a second, but the old primary stays up, and a worker
    keeps its open connection to it (HITs; stores there are lost when it resyncs) until the Sentinel demotes it
    about 10 s later (Sentinel waits 8 s before reconfiguring a server that still says it is a primary) and closes
    its clients' connections. Every request is answered 200 throughout; then new rows are stored on the new primary
    (a MISS, then a HIT), with no restart."""
    client = make_app(**settings(own_sentinels.url())).test_client()
    assert cache_header(predict(client, ROWS[:2])) == ("MISS", "0")
    old, new = own_sentinels.ports
    await_keys(own_sentinels.server(new), 2)
    own_sentinels.sentinel.sentinel_failover("m")
    deadline = time.monotonic() + 20
    while not (own_sentinels.primary() == new and own_sentinels.server(old).info("replication")["role"] == "slave"):
        resp = predict(client, ROWS[:2])
        assert (resp.status_code, resp.headers["X-Cache"]) in {(200, "HIT"), (200, "OFF")}
        assert time.monotonic() < deadline, "the Sentinel did not fail over"
        time.sleep(0.05)
    while (resp := predict(client, ROWS[2:])).headers["X-Cache"] != "HIT":
        assert (resp.status_code, resp.headers["X-Cache"]) in {(200, "MISS"), (200, "OFF")}
        assert time.monotonic() < deadline, "caching did not resume on the new primary"
        time.sleep(0.05)
    assert own_sentinels.server(new).exists(*own_sentinels.server(new).keys("*")) == len(ROWS)
    assert ready(client)["cache"] == "ok"


def test_sentinel_naming_a_replica_is_an_outage_until_it_names_the_primary(make_app, own_sentinels, capsys):
    """A Sentinel whose view is stale names the replica (an old primary, say) as the primary: the replica answers
    the lookup but refuses the store (READONLY), which redis-py reports as a connection error. The request is still
    a 200 MISS; then the cache is down (OFF, /ready "down", not "read-only": that server will never take the writes),
    and once the Sentinel names the real primary, caching resumes after the back-off, with no restart."""
    primary, replica = own_sentinels.ports
    port, workdir = free_port(), own_sentinels.workdir
    conf = workdir / f"stale-{port}.conf"
    # Watching the replica as "m"; it reports itself a replica, which Sentinel only counts as down after a minute.
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {workdir}\nsentinel monitor m 127.0.0.1 {replica} 1\n"
        f"sentinel auth-pass m {PASSWORD}\nsentinel down-after-milliseconds m 60000\n"
    )
    stale = redis.Redis(port=port, socket_timeout=2)
    proc = spawn([redis_binary(), str(conf), "--sentinel"], stdout=workdir / "stale.log", stderr=workdir / "stale.log")
    try:
        await_redis(proc, stale, timeout=10)
        client = make_app(**settings(f"redis+sentinel://:{PASSWORD}@127.0.0.1:{port}/m/0")).test_client()
        first = predict(client, ROWS)
        assert (first.status_code, *cache_header(first)) == (200, "MISS", "0")
        assert predict(client, ROWS).headers["X-Cache"] == "OFF"
        assert ready(client) == {"status": "degraded", "model": "ok", "cache": "down", "cache_reason": "down"}
        assert "The previous master is now a slave" in capsys.readouterr().out
        stale.sentinel_remove("m")
        stale.sentinel_monitor("m", "127.0.0.1", primary, 1)
        deadline = time.monotonic() + 5
        while (resp := predict(client, ROWS)).headers["X-Cache"] != "HIT":
            assert (resp.status_code, resp.headers["X-Cache"]) in {(200, "MISS"), (200, "OFF")}
            assert time.monotonic() < deadline, "caching did not resume"
            time.sleep(0.05)
        assert len(own_sentinels.server(primary).keys("*")) == len(ROWS)
        assert ready(client)["cache"] == "ok"
    finally:
        stop(proc)


# Malformed Sentinel URLs, each carrying a password that must never reach the log.
BAD_URLS = [
    "redis+sentinel://:hunter2@127.0.0.1:26379",  # no primary name
    "redis+sentinel://:hunter2@127.0.0.1:26379/",  # an empty one
    "redis+sentinel://:hunter2@/m",  # no Sentinel
    "redis+sentinel://:hunter2@127.0.0.1:26379,/m",  # an empty host in the list
    "redis+sentinel://:hunter2@127.0.0.1:99999/m",  # a port past 65535
    "redis+sentinel://:hunter2@127.0.0.1:port/m",
    "redis+sentinel://:hunter2@127.0.0.1:26379/m/zero",  # a database that is not a number
    "rediss+sentinel://:hunter2@127.0.0.1:26379/m?socket_timeout=soon",  # an option redis-py refuses
]
RULE = (
    "REDIS_URL must be redis+sentinel://[[user]:password@]host:port[,host:port...]/<primary name>[/<db>] "
    "(rediss+sentinel:// for TLS to the primary)"
)


@pytest.mark.parametrize("url", BAD_URLS)
def test_malformed_sentinel_url_stops_startup_in_one_line(tmp_path, make_app, url):
    """A malformed Sentinel URL stops startup, from the environment or a mapping, with one line naming REDIS_URL
    that never quotes the URL (or its password)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "REDIS_URL": url}
    proc = subprocess.run(
        [sys.executable, "-c", "import config"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"sibyl: cannot start: {RULE}"]
    with pytest.raises(StartupError) as e:
        make_app(REDIS_URL=url)
    assert str(e.value) == RULE


def test_cluster_with_a_sentinel_url_stops_startup(make_app):
    """REDIS_CLUSTER=true with Sentinels is a contradiction: one line, the URL not quoted."""
    with pytest.raises(StartupError) as e:
        make_app(REDIS_URL="redis+sentinel://:hunter2@127.0.0.1:26379/m", REDIS_CLUSTER="true")
    assert (
        str(e.value) == "REDIS_URL names Sentinels (one primary and its replicas), not a cluster: unset REDIS_CLUSTER"
    )


@pytest.mark.parametrize(
    ("url", "parts"),
    [
        ("redis+sentinel://s1:26379,s2/m", ([("s1", 26379), ("s2", 26379)], "m", {}, {})),
        (
            "redis+sentinel://:pw@127.0.0.1:5000/cache/2",
            ([("127.0.0.1", 5000)], "cache", {"password": "pw", "db": 2}, {}),
        ),
        (
            "rediss+sentinel://sibyl:p%40ss@[::1]:26379,s2:1/m?ssl_ca_certs=/ca.pem&sentinel_password=sp",
            (
                [("::1", 26379), ("s2", 1)],
                "m",
                {"username": "sibyl", "password": "p@ss", "ssl": True, "ssl_ca_certs": "/ca.pem"},
                {"password": "sp"},
            ),
        ),
    ],
)
def test_sentinel_url_parts(url, parts):
    """The Sentinels (port 26379 when omitted, IPv6 in brackets), the primary's name, the primary's connection
    options (user, password, database, TLS and query options as redis-py reads them) and the Sentinels' own."""
    assert config.sentinel_url(url) == parts


def await_keys(server: redis.Redis, n: int) -> None:
    """Wait until a server holds n keys (a replica receives the primary's writes asynchronously)."""
    deadline = time.monotonic() + 5
    while len(server.keys("*")) < n:
        assert time.monotonic() < deadline, f"the server did not receive {n} keys"
        time.sleep(0.02)
