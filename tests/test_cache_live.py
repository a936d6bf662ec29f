"""The prediction cache under real gunicorn workers and a real redis-server: shared hits, outages, recovery."""

import random
import threading
import time

import requests
from conftest import IRIS_ROWS

from tests.support.servers import tcp_sockets

# Rows the load run repeats (so some answers come from the cache) beside unique random ones.
REPEATED = [*IRIS_ROWS, [5.9, 3.0, 4.2, 1.5], [6.3, 2.5, 5.0, 1.9]]


def served_by(server, request_id: str) -> dict:
    """The request log line of one request (the line is written before the response leaves the worker)."""
    (line,) = [x for x in server.request_lines() if x["request_id"] == request_id]
    return line


def test_answered_row_is_a_hit_for_the_next_request_on_the_other_worker(live_server, redis_server, redis_url):
    """A row one worker answered is in Redis before its response leaves: the other worker's very next request for
    it is a HIT (from Redis: that worker never saw the row), and a batch holding it a PARTIAL. No wait anywhere:
    each held request is taken by one worker, the row's request by the other, then the held one completes."""
    server = live_server(env={"REDIS_URL": redis_url, "CACHE_TIMEOUT_MS": "1000"}, workers=2)
    watcher = redis_server.client()
    for n, (row, batch) in enumerate(((REPEATED[0], False), (REPEATED[1], True))):
        rows = [row, REPEATED[2 + n]] if batch else [row]
        held = server.held_predict({"features": rows}, headers={"X-Request-ID": f"held-{n}"})
        answered = server.predict({"features": [row]}, headers={"X-Request-ID": f"answered-{n}"})
        assert answered.headers["X-Cache"] == "MISS"
        assert watcher.dbsize() == n + 1  # stored before the response left
        status, headers, body = held.finish()
        assert (status, headers["X-Cache"], headers["X-Cache-Hits"]) == (200, "PARTIAL" if batch else "HIT", "1")
        if not batch:
            assert body == answered.content
        assert served_by(server, f"held-{n}")["pid"] != served_by(server, f"answered-{n}")["pid"]

    # Each worker opened its own connection after the fork; the master (which loaded the app) holds none.
    workers = {x["pid"] for x in server.request_lines()}
    assert len(workers) == 2
    assert tcp_sockets(server.proc.pid, redis_server.port, remote=True) == set()
    a, b = (tcp_sockets(pid, redis_server.port, remote=True) for pid in workers)
    assert a and b
    assert not a & b


def test_redis_outage_under_load_serves_uncached_and_recovers(live_server, own_redis):
    """Killing Redis under load fails no request; after a restart on the same port both workers hit again."""
    redis_server = own_redis()
    server = live_server(
        # No worker-local tier here: every HIT must have come from Redis.
        env={
            "REDIS_URL": redis_server.url,
            "CACHE_RETRY_SECONDS": "0.5",
            "CACHE_TIMEOUT_MS": "500",
            "CACHE_LOCAL_ENTRIES": "0",
        },
        workers=2,
    )
    results: list[tuple] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 2.5

    def load(seed: int) -> None:
        """Requests on fresh connections (so both workers serve) until the deadline, at most 400 each."""
        rng = random.Random(seed)
        for _ in range(400):
            if time.monotonic() > stop_at:
                return
            repeat = rng.random() < 0.5
            row = rng.choice(REPEATED) if repeat else [round(rng.uniform(4, 8), 3) for _ in range(4)]
            try:
                resp = server.predict({"features": [row]}, timeout=5)
                outcome = (resp.status_code, resp.headers.get("X-Cache"))
            except requests.RequestException as e:
                outcome = (type(e).__name__, None)
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=load, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.7)
    redis_server.stop()
    time.sleep(0.8)
    redis_server.start()
    for t in threads:
        t.join(15)

    assert not any(t.is_alive() for t in threads)
    assert len(results) >= 40, "the load run barely ran"
    assert {status for status, _ in results} == {200}
    outcomes = {outcome for _, outcome in results}
    assert {"HIT", "OFF"} <= outcomes  # cached before the kill, uncached during the outage

    # Hits resume in both workers without restarting gunicorn (the breaker re-probes after 0.5 s).
    before = {x["pid"] for x in server.request_lines()}
    hit_pids = set()
    deadline = time.monotonic() + 10
    for i in range(100):
        if len(hit_pids) == 2 or time.monotonic() > deadline:
            break
        # One request held on one worker, one answered by the other: each round asks both workers.
        held = server.held_predict({"features": [REPEATED[0]]}, headers={"X-Request-ID": f"held-{i}"})
        free = server.predict({"features": [REPEATED[0]]}, headers={"X-Request-ID": f"free-{i}"})
        status, headers, _ = held.finish()
        for rid, answer in (
            (f"free-{i}", (free.status_code, free.headers["X-Cache"])),
            (f"held-{i}", (status, headers["X-Cache"])),
        ):
            assert answer[0] == 200
            if answer[1] == "HIT":
                hit_pids.add(served_by(server, rid)["pid"])
        time.sleep(0.1)
    assert len(hit_pids) == 2
    assert hit_pids <= before  # the same two workers, not replacements
    assert server.proc.poll() is None

    # Each worker that saw the outage logged it once and its recovery once, never once per request.
    messages = [x["message"] for x in server.log_lines()]
    down = sum(m.startswith("cache down") for m in messages)
    up = sum(m.startswith("cache back up") for m in messages)
    assert 1 <= down <= 2
    assert up == down
